"""A method runner for worker tests: SIGTERM arrives, and it stops at its next cut-off."""

from __future__ import annotations

from typing import Any

from services.trainer.worker_io import Cancelled, WorkerContext


async def run(ctx: WorkerContext) -> dict[str, Any]:
    ctx.stop.set()  # the SIGTERM
    raise Cancelled()
