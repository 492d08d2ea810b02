"""Run a TLM server on its own event loop in a background thread (tests, demo, benchmarks).

Tests then use ordinary blocking or asyncio clients without sharing the server's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from services.common.server import RunningServer, ServiceBinding, start_server
from services.common.settings import ServerSettings


class ServerThread:
    """Start with `start()`, read `.address`, stop with `stop()` (or use as a context manager)."""

    def __init__(
        self,
        make_bindings: Callable[[], Sequence[ServiceBinding]],
        settings: ServerSettings,
    ) -> None:
        self._make_bindings = make_bindings
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    @property
    def address(self) -> str:
        assert self.running is not None, "server not started"
        return self.running.address

    def _submit(self, coro):  # type: ignore[no-untyped-def]
        future: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=120)

    def start(self) -> ServerThread:
        self._thread.start()

        async def _start() -> RunningServer:
            # Bindings are built on the server's loop so their asyncio objects belong to it.
            return await start_server(self._make_bindings(), self._settings)

        self.running = self._submit(_start())
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self.running is not None:
            self._submit(self.running.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
