"""A rank that trains until SIGTERM, then stops as the real worker does (`worker.py`): it
reports a cancel through `RankEvents`, which says it only when the service asked for one (the
job folder's cancel file). Each rank marks that it started (`rank-<n>.ready`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from services.trainer.distributed import RankEvents, rank

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (folder / f"rank-{rank()}.ready").touch()
    stop.wait(60)  # stopped long before; bounded in case a test leaks it
    events = RankEvents(folder)
    events.emit("cancelled")
    events.close()
