"""The console's Starlette app: sign-in (the caller's API key in a cookie), the page modules'
routes, static files, and one place that turns service errors into pages.

Mounted at `/console` by the gateway (services/gateway/server.py) and by `tlm serve console`
(services/console/server.py). Every page calls the services through services/clients/ with the
signed-in key; the console keeps nothing of its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import structlog
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import TlmError, Unauthenticated
from services.console.clients import ClientPool, Clients
from services.gateway.errors import from_domain

log = structlog.get_logger("tlm.console")
HERE = Path(__file__).parent
BASE = "/console"  # where the console lives, served alone or by the gateway
COOKIE = "tlm_console_key"
COOKIE_DAYS = 7


class Console:
    """What every page needs: the clients of the signed-in caller and the templates."""

    def __init__(self, address: str | None) -> None:
        self.pool = ClientPool(address)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.globals["base"] = BASE

    def clients(self, request: Request) -> Clients:
        return self.pool.for_key(request.cookies.get(COOKIE) or None)

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("signed_in", bool(request.cookies.get(COOKIE)))
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    async def close(self) -> None:
        await self.pool.close()


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form (htmx and plain forms send these), last value of each name.
    Parsed with the standard library: the console has no file-part forms (uploads send the
    file as the body), so it needs no multipart parser."""
    return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))


class Timing:
    """`Server-Timing: app;dur=<ms>` on every response: the time until its headers, which for a
    page is the whole of its work (templates render before they send). Plain ASGI, so event
    streams pass through untouched. Tests hold pages under 300 ms on the embedded services."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = 1000 * (time.perf_counter() - started)
                headers = MutableHeaders(scope=message)
                headers.append("Server-Timing", f"app;dur={ms:.1f}")
            await send(message)

        await self.app(scope, receive, timed)


def create_console(address: str | None) -> tuple[Starlette, Console]:
    """The app to mount at BASE, and its Console (close it when the server stops)."""
    from services.console import pages_catalog, pages_jobs, pages_people

    console = Console(address)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return console.render(request, "login.html", next=request.query_params.get("next"))
        form = await form_of(request)
        target = form.get("next") or f"{BASE}/models"
        response = RedirectResponse(target if target.startswith(BASE) else BASE, 303)
        response.set_cookie(
            COOKIE,
            form.get("api_key", "").strip(),
            max_age=COOKIE_DAYS * 86400,
            httponly=True,
            samesite="strict",  # never sent with another site's request: no cross-site forms
            secure=request.url.scheme == "https",
            path=BASE,
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse(f"{BASE}/login", 303)
        response.delete_cookie(COOKIE, path=BASE)
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse(f"{BASE}/models", 303)

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TlmError)
        if isinstance(exc, Unauthenticated):
            if request.headers.get("hx-request"):
                return HTMLResponse("", headers={"HX-Redirect": f"{BASE}/login"})
            return RedirectResponse(f"{BASE}/login?next={request.url.path}", 303)
        log.info("console_error", path=request.url.path, error=exc.message)
        return console.render(request, "error.html", status=_status(exc), error=exc)

    routes = [
        Route("/", home),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        *pages_catalog.routes(console),
        *pages_jobs.routes(console),
        *pages_people.routes(console),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Timing)],
        exception_handlers={TlmError: on_error},
    )
    return app, console


def _status(exc: TlmError) -> int:
    """The HTTP status of a service's error: the gateway's table, one for both."""
    return from_domain(exc).status
