"""Wait for a condition, not for a guess at how long it takes: tests order events by polling
for the state they need, with a deadline that fails the test naming what never happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_S = 0.01


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """Return as soon as `condition()` is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what or condition}"
        time.sleep(POLL_S)


async def until(condition: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """`wait_for` on the event loop: other tasks run while it polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what or condition}"
        await asyncio.sleep(POLL_S)
