"""`tlm serve console`: the web console alone (the gateway serves it too, at /console)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.cli.errors import err_console
from services.common.logs import configure_logging


def serve_console(
    port: int | None, host: str | None, insecure_dev: bool | None, ready_file: Path | None
) -> None:
    """Run the console over HTTP, configured as the gateway is (TLM_GATEWAY_...)."""
    from services.console.server import serve_console as run
    from services.gateway.settings import GatewaySettings

    flags = {"port": port, "host": host, "insecure_dev": insecure_dev}
    settings = GatewaySettings(**{k: v for k, v in flags.items() if v is not None})  # type: ignore[arg-type]
    configure_logging(settings.log_json, settings.log_level)

    def ready(url: str) -> None:
        err_console.print(f"[bold green]TLM console[/] on {url}")
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(url)
            tmp.replace(ready_file)

    asyncio.run(run(settings, ready))
