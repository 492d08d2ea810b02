"""The grpc.aio server bootstrap every service shares: health checking, reflection, the
interceptor, message-size limits, port 0 for tests and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.auth import Authenticator
from services.common.interceptor import ServerInterceptor
from services.common.metrics import start_metrics_server
from services.common.settings import ServerSettings

log = structlog.get_logger("tlm.server")


@dataclass
class ServiceBinding:
    """One service to mount: its full proto name, how to add it, and lifecycle hooks."""

    name: str
    register: Callable[[grpc.aio.Server], None]
    # Called with the server's own address once the port is bound, before it serves.
    on_start: Callable[[str], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    address: str
    health: HealthServicer
    bindings: Sequence[ServiceBinding]
    metrics_port: int | None = None
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let running calls finish for `grace` seconds, then stop."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for binding in reversed(self.bindings):
            if binding.on_stop is not None:
                await binding.on_stop()
        log.info("server_stopped", address=self.address)


def authenticator(
    settings: ServerSettings, keys_variable: str = "TLM_<SERVICE>_API_KEYS"
) -> Authenticator:
    """The settings' key table; without keys, exit unless --insecure-dev (then warn)."""
    if not settings.api_keys and not settings.insecure_dev:
        raise SystemExit(
            f'no API keys configured: set {keys_variable}=\'{{"key": "team"}}\', '
            "or pass --insecure-dev for local use"
        )
    if not settings.api_keys:
        log.warning(
            "insecure_dev_mode",
            message="no API keys: every caller is treated as team 'dev'. Do not expose this port.",
        )
    return Authenticator(dict(settings.api_keys), settings.insecure_dev)


class CannotBind(Exception):
    """The server could not listen on its host and port."""


def _add_port(server: grpc.aio.Server, settings: ServerSettings) -> int:
    target = f"{settings.host}:{settings.port}"
    try:
        return _bind(server, settings, target)
    except RuntimeError as exc:  # grpcio's only signal, "Failed to bind to address ..."
        raise CannotBind(
            f"cannot listen on {target}: the port is in use, or the host is not an address of "
            "this machine"
        ) from exc


def _bind(server: grpc.aio.Server, settings: ServerSettings, target: str) -> int:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(target)
    ca = settings.tls_client_ca_file
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca.read_bytes() if ca else None,
        require_client_auth=ca is not None,
    )
    log.info("tls_enabled", mutual=ca is not None)
    return server.add_secure_port(target, credentials)


async def start_server(
    bindings: Sequence[ServiceBinding], settings: ServerSettings
) -> RunningServer:
    """Start a server for `bindings`; with settings.port 0 it binds a free port."""
    keys = authenticator(settings)
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ServerInterceptor(keys)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            # Clients reconnect (and re-resolve DNS) now and then, so new replicas get traffic.
            ("grpc.max_connection_age_ms", 30 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 5 * 60 * 1000),
        ],
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for binding in bindings:
        binding.register(server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = _add_port(server, settings)
    address = f"{settings.host}:{port}"
    for binding in bindings:
        if binding.on_start is not None:
            await binding.on_start(address)
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ["", *names]:
        await health.set(name, serving)
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = start_metrics_server(settings.metrics_port)
    log.info("server_started", address=address, services=names, metrics_port=metrics_port)
    return RunningServer(server, port, address, health, bindings, metrics_port)


async def until_signalled() -> None:
    """Wait for SIGTERM (what Kubernetes sends first) or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_forever(
    bindings: Sequence[ServiceBinding],
    settings: ServerSettings,
    ready: Callable[[RunningServer], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start_server(bindings, settings)
    if ready is not None:
        ready(running)
    await until_signalled()
    log.info("shutdown_requested", grace_s=settings.grace_period_s)
    await running.stop(settings.grace_period_s)
