"""A registry of its own per test (on a port of its choosing, or one given: restarts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.devtools.server_thread import ServerThread
from services.registry.app import binding
from services.registry.settings import RegistrySettings


def registry(data_dir: Path, port: int = 0, **settings: Any) -> ServerThread:
    """A started registry server; without `api_keys`, keyless (team `dev`)."""
    settings.setdefault("insecure_dev", not settings.get("api_keys"))
    config = RegistrySettings(host="127.0.0.1", port=port, data_dir=data_dir, **settings)
    return ServerThread(lambda: [binding(config)], config).start()
