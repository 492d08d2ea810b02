"""Running the gateway: uvicorn on the caller's event loop, next to the gRPC server in `tlm up
--http-port PORT`, or alone in `tlm serve gateway`. The port is bound before uvicorn starts, so
port 0 works (tests) and the bound port is known."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
import uvicorn

from services.clients.deploy import DeployClient
from services.clients.rollout import RolloutClient
from services.common.metrics import start_metrics_server
from services.common.server import (
    CannotBind,
    RunningServer,
    ServiceBinding,
    authenticator,
    start_server,
    until_signalled,
)
from services.common.settings import ServerSettings
from services.console.app import BASE as CONSOLE_PATH
from services.console.app import Console, create_console
from services.gateway.app import create_app
from services.gateway.backend import Backend
from services.gateway.settings import GatewaySettings

log = structlog.get_logger("tlm.gateway")


@dataclass
class RunningGateway:
    server: uvicorn.Server
    sockets: list[socket.socket]
    task: asyncio.Task[None]
    backend: Backend
    port: int
    url: str
    console: Console | None = None  # the web console, mounted at /console

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (the grace period), close the clients."""
        self.server.should_exit = True
        await self.task
        await self.server.shutdown(sockets=self.sockets)
        await self.backend.close()
        if self.console is not None:
            await self.console.close()
        log.info("gateway_stopped", url=self.url)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotBind(f"cannot listen on {host}:{port} (HTTP): {exc.strerror}") from exc
    return sock


def _config(app: object, settings: GatewaySettings) -> uvicorn.Config:
    ca = settings.tls_client_ca_file
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_config=None,  # structlog's handlers, as everywhere else
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(settings.grace_period_s),
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        ssl_ca_certs=str(ca) if ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if ca else ssl.CERT_NONE,
    )


async def start_http(
    app: object, settings: GatewaySettings, sock: socket.socket
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """uvicorn serving `app` on the bound `sock`, on this event loop, until `should_exit`."""
    config = _config(app, settings)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    return server, asyncio.create_task(server.main_loop())


async def start_gateway(
    settings: GatewaySettings, grpc_address: str | None = None
) -> RunningGateway:
    """Serve the gateway on settings.host:port; the deploy service and serving pool default to
    `grpc_address` (the `tlm up` server), then TLM_ADDRESS."""
    keys = authenticator(settings, "TLM_GATEWAY_API_KEYS")
    key = settings.outgoing_key()
    backend = Backend(
        DeployClient(settings.deploy_address or grpc_address, api_key=key),
        RolloutClient(settings.rollout_address or grpc_address, api_key=key),
        settings.request_timeout_s,
    )
    sock = _bind(settings.host, settings.port)
    app = create_app(backend, keys, settings.max_message_bytes)
    # The web console: the same services, called with each browser user's own API key.
    console_app, console = create_console(grpc_address)
    app.mount(CONSOLE_PATH, console_app)
    server, task = await start_http(app, settings, sock)
    if settings.metrics_port is not None:
        start_metrics_server(settings.metrics_port)
    port = sock.getsockname()[1]
    scheme = "https" if settings.tls_cert_file else "http"
    url = f"{scheme}://{settings.host}:{port}"
    log.info("gateway_started", url=url)
    return RunningGateway(server, [sock], task, backend, port, url, console)


async def serve_gateway(settings: GatewaySettings, ready: Callable[[str], None]) -> None:
    """`tlm serve gateway`: the gateway alone until SIGTERM or SIGINT."""
    gateway = await start_gateway(settings)
    ready(gateway.url)
    await until_signalled()
    await gateway.stop()


def embedded_settings(shared: ServerSettings, http_port: int) -> GatewaySettings:
    """The gateway of `tlm up`: the gRPC server's keys, host and TLS, on `http_port`."""
    values = shared.model_dump(include=set(ServerSettings.model_fields))
    return GatewaySettings.model_validate(values | {"port": http_port})


async def serve_up(
    bindings: Sequence[ServiceBinding],
    settings: ServerSettings,
    http_port: int | None,
    ready: Callable[[RunningServer], None],
) -> None:
    """`tlm up`: every service on one gRPC port and, with `http_port`, the gateway in front of
    them; until SIGTERM or SIGINT, then both stop gracefully."""
    running = await start_server(bindings, settings)
    gateway = None
    if http_port is not None:
        gateway = await start_gateway(embedded_settings(settings, http_port), running.address)
    ready(running)
    await until_signalled()
    if gateway is not None:
        await gateway.stop()
    await running.stop(settings.grace_period_s)
