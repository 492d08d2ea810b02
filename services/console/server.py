"""`tlm serve console`: the console alone over HTTP, for a deployment that serves the
OpenAI-compatible endpoint elsewhere. It takes the gateway's settings (TLM_GATEWAY_...: port,
host, TLS) and its HTTP server; the services are found as the CLI finds them
(TLM_<SERVICE>_ADDRESS, then TLM_ADDRESS), and each caller signs in with their own key."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from services.common.server import until_signalled
from services.console.app import BASE, Console, create_console
from services.gateway.server import _bind, start_http
from services.gateway.settings import GatewaySettings

log = structlog.get_logger("tlm.console")


def standalone_app(address: str | None) -> tuple[Starlette, Console]:
    """The console at BASE, with `/` sending there and `/health` for probes."""
    console_app, console = create_console(address)

    async def root(request: Request) -> Response:
        return RedirectResponse(f"{BASE}/", 303)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    routes = [Route("/", root), Route("/health", health), Mount(BASE, console_app)]
    return Starlette(routes=routes), console


async def serve_console(settings: GatewaySettings, ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    app, console = standalone_app(None)
    sock = _bind(settings.host, settings.port)
    server, task = await start_http(app, settings, sock)
    scheme = "https" if settings.tls_cert_file else "http"
    url = f"{scheme}://{settings.host}:{sock.getsockname()[1]}{BASE}/"
    log.info("console_started", url=url)
    ready(url)
    await until_signalled()
    server.should_exit = True
    await task
    await server.shutdown(sockets=[sock])
    await console.close()
