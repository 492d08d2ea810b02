"""`tlm serve gateway` and `tlm serve console`: one HTTP server alone, configured as the gateway
is (TLM_GATEWAY_...); the gateway serves the console too, at /console."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from pathlib import Path

from services.cli.errors import err_console
from services.common.logs import configure_logging

# What `tlm serve NAME` runs for an HTTP server: (banner, "module:coroutine function").
HTTP_SERVERS = {
    "gateway": ("TLM gateway", "services.gateway.server:serve_gateway"),
    "console": ("TLM console", "services.console.server:serve_console"),
}


def ready_writer(banner: str, ready_file: Path | None) -> Callable[[str], None]:
    """Announce the bound address on stderr and, atomically, in `ready_file` if one is given."""

    def ready(address: str) -> None:
        err_console.print(f"[bold green]{banner}[/] on {address}")
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(address)
            tmp.replace(ready_file)

    return ready


def serve_http(
    name: str,
    port: int | None,
    host: str | None,
    insecure_dev: bool | None,
    ready_file: Path | None,
) -> None:
    """Run the HTTP server `name` (a key of HTTP_SERVERS) until interrupted."""
    from services.gateway.settings import GatewaySettings

    banner, target = HTTP_SERVERS[name]
    module, function = target.split(":")
    run = getattr(importlib.import_module(module), function)
    flags = {"port": port, "host": host, "insecure_dev": insecure_dev}
    settings = GatewaySettings(**{k: v for k, v in flags.items() if v is not None})  # type: ignore[arg-type]
    configure_logging(settings.log_json, settings.log_level)
    asyncio.run(run(settings, ready_writer(banner, ready_file)))
