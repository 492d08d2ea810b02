"""A worker that follows a script named by the job's output model, for supervisor tests:
`models/sleep` logs a line and sleeps until killed; `models/succeed` writes scratch folders
(checkpoints/, output/) and reports a result; `models/resume` logs steps 5 and 6 (as a job
resumed from step 4) and reports a result."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.trainer.worker_protocol import SCRATCH, EventWriter, WorkerJob

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
    events.emit("log", level="info", message="sleeping")
    time.sleep(60)  # killed long before; bounded in case a test leaks it
