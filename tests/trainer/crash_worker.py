"""A worker that dies hard after its first event: `TLM_TRAINER_WORKER_MODULE` in crash tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.trainer.worker_protocol import EventWriter

if __name__ == "__main__":
    events = EventWriter(Path(sys.argv[1]))
    events.emit("log", level="info", message="about to crash")
    os._exit(3)
