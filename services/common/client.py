"""Client-side plumbing: addresses from the environment, API keys in metadata, size limits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.common.settings import DEFAULT_PORT

DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
SERVICES = ("registry", "reward", "rollout", "trainer")
CHANNEL_OPTIONS: Sequence[tuple[str, int | str]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # With a dns:/// address of a headless service, spread calls over every replica.
    ("grpc.lb_policy_name", "round_robin"),
)


def resolve_address(service: str | None = None, address: str | None = None) -> str:
    """Explicit address, else TLM_<SERVICE>_ADDRESS, else TLM_ADDRESS, else localhost:50051."""
    if address:
        return address
    if service:
        specific = os.environ.get(f"TLM_{service.upper()}_ADDRESS")
        if specific:
            return specific
    return os.environ.get("TLM_ADDRESS", DEFAULT_ADDRESS)


def call_metadata(
    api_key: str | None = None, team: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Metadata: the API key (argument or TLM_API_KEY) and, for service keys, the team."""
    key = api_key or os.environ.get("TLM_API_KEY")
    md: list[tuple[str, str]] = []
    if key:
        md.append(("authorization", f"Bearer {key}"))
    if team:
        md.append(("x-tlm-team", team))
    return tuple(md)


def tls_credentials() -> grpc.ChannelCredentials | None:
    """TLS for outgoing calls when TLM_TLS_CA_FILE names the CA that signed the servers'
    certificates (plus TLM_TLS_CERT_FILE / TLM_TLS_KEY_FILE for mutual TLS); else plaintext."""
    ca = os.environ.get("TLM_TLS_CA_FILE")
    if not ca:
        return None
    cert, key = os.environ.get("TLM_TLS_CERT_FILE"), os.environ.get("TLM_TLS_KEY_FILE")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def aio_channel(address: str) -> grpc.aio.Channel:
    credentials = tls_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
    return grpc.aio.secure_channel(address, credentials, options=list(CHANNEL_OPTIONS))


def sync_channel(address: str) -> grpc.Channel:
    credentials = tls_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))
    return grpc.secure_channel(address, credentials, options=list(CHANNEL_OPTIONS))
