"""Client-side plumbing: addresses from the environment, API keys in metadata, size limits, and
the retry policy every TLM client channel carries (gRPC's own, from its service config)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.settings import DEFAULT_PORT

DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
SERVICES = ("registry", "reward", "rollout", "trainer", "deploy")
CHANNEL_OPTIONS: Sequence[tuple[str, int | str]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # With a dns:/// address of a headless service, spread calls over every replica.
    ("grpc.lb_policy_name", "round_robin"),
)
# gRPC clamps a retry policy's maxAttempts to 5 (gRFC A6).
MAX_ATTEMPTS_CAP = 5
# Reads (and calls with a request id) may also retry DEADLINE_EXCEEDED that a server sent.
IDEMPOTENT_PREFIXES = ("Get", "List", "Download", "Read", "Validate", "Estimate", "Watch")


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries a call that failed with UNAVAILABLE (every method) or
    DEADLINE_EXCEEDED (reads and calls carrying a request id): at most `max_attempts` tries
    in all, the n-th retry after min(initial * multiplier**(n-1), max) seconds, +-20% (gRPC
    core's exponential backoff and jitter). The default waits 0.1, 0.2, 0.4, 0.8 s: a blip
    of about 1.5 s is invisible, and nothing listening fails in that time (a longer outage is
    the caller's to wait out, e.g. the trainer's `outage_timeout`). gRPC retries a call only
    until the first response arrives, so a stream that has answered is never replayed.
    1 attempt: no retry.

    From the environment: TLM_CLIENT_MAX_ATTEMPTS, TLM_CLIENT_INITIAL_BACKOFF_S,
    TLM_CLIENT_MAX_BACKOFF_S, TLM_CLIENT_BACKOFF_MULTIPLIER.

    >>> RetryPolicy(max_attempts=6)
    Traceback (most recent call last):
    ...
    ValueError: max_attempts must be 1..5 (gRPC's cap), not 6
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_CAP:
            raise ValueError(
                f"max_attempts must be 1..{MAX_ATTEMPTS_CAP} (gRPC's cap), not {self.max_attempts}"
            )
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("backoff: need 0 < initial_backoff_s <= max_backoff_s")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be >= 1")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy with TLM_CLIENT_* overrides."""
        env, default = os.environ, cls()
        return cls(
            max_attempts=int(env.get("TLM_CLIENT_MAX_ATTEMPTS", default.max_attempts)),
            initial_backoff_s=float(
                env.get("TLM_CLIENT_INITIAL_BACKOFF_S", default.initial_backoff_s)
            ),
            max_backoff_s=float(env.get("TLM_CLIENT_MAX_BACKOFF_S", default.max_backoff_s)),
            backoff_multiplier=float(
                env.get("TLM_CLIENT_BACKOFF_MULTIPLIER", default.backoff_multiplier)
            ),
        )

    def _json(self, codes: list[str]) -> dict[str, object]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:g}s",
            "maxBackoff": f"{self.max_backoff_s:g}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": codes,
        }

    def service_config(self, services: Sequence[ServiceDescriptor]) -> str:
        """The `grpc.service_config` JSON: per method, the codes above; "" for no retries."""
        if self.max_attempts == 1:
            return ""
        idempotent = [
            {"service": s.full_name, "method": m.name}
            for s in services
            for m in s.methods
            if m.name.startswith(IDEMPOTENT_PREFIXES) or "request_id" in m.input_type.fields_by_name
        ]
        configs = [
            {"name": idempotent, "retryPolicy": self._json(["UNAVAILABLE", "DEADLINE_EXCEEDED"])},
            {
                "name": [{"service": s.full_name} for s in services],
                "retryPolicy": self._json(["UNAVAILABLE"]),
            },
        ]
        return json.dumps({"methodConfig": [c for c in configs if c["name"]]})

    def channel_options(self, services: Sequence[ServiceDescriptor]) -> list[tuple[str, int | str]]:
        """Channel options: the service config, and reconnection that starts at 0.1 s and
        backs off no further than the retries (gRPC's default waits 1 s, then up to 120 s,
        before it dials a down server again, failing every retry in between at once)."""
        config = self.service_config(services)
        if not config:
            return [("grpc.enable_retries", 0)]
        return [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", config),
            ("grpc.initial_reconnect_backoff_ms", int(min(self.initial_backoff_s, 0.1) * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_backoff_s * 1000)),
        ]


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


def aio_channel(
    address: str,
    extra_options: Sequence[tuple[str, int | str]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    insecure: bool = False,
) -> grpc.aio.Channel:
    """An asyncio channel; TLS from `credentials`, else (unless `insecure`) from
    TLM_TLS_CA_FILE when set."""
    options = [*CHANNEL_OPTIONS, *extra_options]
    if credentials is None and not insecure:
        credentials = tls_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def sync_channel(address: str, extra_options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
    options = [*CHANNEL_OPTIONS, *extra_options]
    credentials = tls_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
