"""Run the HTTP gateway on its own event loop in a background thread (tests, benchmarks), as
ServerThread does for the gRPC services."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from services.gateway.server import RunningGateway, start_gateway
from services.gateway.settings import GatewaySettings

T = TypeVar("T")


class GatewayThread:
    """Start with `start()`, read `.url`, stop with `stop()`."""

    def __init__(self, settings: GatewaySettings, grpc_address: str | None = None) -> None:
        self._settings = settings
        self._grpc_address = grpc_address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.running: RunningGateway | None = None

    @property
    def url(self) -> str:
        assert self.running is not None, "gateway not started"
        return self.running.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def start(self) -> GatewayThread:
        self._thread.start()
        self.running = self._run(start_gateway(self._settings, self._grpc_address))
        return self

    def stop(self) -> None:
        if self.running is not None:
            self._run(self.running.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
