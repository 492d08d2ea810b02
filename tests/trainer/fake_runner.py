"""A method runner for worker tests: the cancel arrives while its upload finishes."""

from __future__ import annotations

from typing import Any

from services.trainer.worker_io import WorkerContext


async def run(ctx: WorkerContext) -> dict[str, Any]:
    ctx.stop.set()  # SIGTERM during the upload, after the revision was committed
    return {"output_model_revision": "models/m/revisions/r1", "metrics": {"train_loss": 1.0}}
