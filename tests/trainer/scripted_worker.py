"""A worker that follows a script named by the job's output model, for supervisor tests:
`models/sleep` logs a line and sleeps until killed; `models/succeed` writes scratch folders
(checkpoints/, output/) and reports a result; `models/resume` logs steps 5 and 6 (as a job
resumed from step 4) and reports a result; `models/metrics` logs the RL metrics of `METRICS`
for steps 1..4 (and an eval loss at the end) and reports a result."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.trainer.worker_protocol import SCRATCH, EventWriter, WorkerJob

STEPS = 4


def metrics(step: int) -> dict[str, float]:
    """What `models/metrics` logs at `step`: a reward that rises, KL that grows, loss that falls."""
    return {"reward_mean": step / 4, "reward_std": 0.1, "kl": step / 100, "loss": 1 / step}


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    job = WorkerJob.read(folder)
    events = EventWriter(folder)
    if job.spec["output_model"] == "models/succeed":
        for name in SCRATCH:
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "weights").write_text("x")
        events.emit("result", output_model_revision="models/succeed/revisions/r1", metrics={})
        sys.exit(0)
    if job.spec["output_model"] == "models/resume":
        for step in (5, 6):
            events.emit("metrics", step=step, epoch=0.0, values={"loss": 1.0})
        events.emit("result", output_model_revision="models/resume/revisions/r1", metrics={})
        sys.exit(0)
    if job.spec["output_model"] == "models/metrics":
        events.emit("started", total_steps=STEPS)
        for step in range(1, STEPS + 1):
            events.emit("metrics", step=step, epoch=step / STEPS, values=metrics(step))
        events.emit("metrics", step=STEPS, epoch=1.0, values={"eval_loss": 0.5})
        events.emit("result", output_model_revision="models/metrics/revisions/r1", metrics={})
        sys.exit(0)
    events.emit("log", level="info", message="sleeping")
    time.sleep(60)  # killed long before; bounded in case a test leaks it
