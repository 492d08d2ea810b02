"""What a worker process and the service exchange, through files in the job's folder:

- `job.json` (service -> worker): the job name, team, spec, device plan and service addresses;
  the API key travels in the environment (`TLM_TRAINER_WORKER_API_KEY`), never on disk.
- `events.jsonl` (worker -> service): one JSON object per line, appended and flushed; the
  service tails it. Kinds: started, metrics, checkpoint, log, result, error, cancelled.
- `worker.log`: the worker's stdout and stderr.
- `checkpoints/`: TRL checkpoints, for resuming; `output/`: the result before its upload.
  Both are deleted when the job SUCCEEDS or is CANCELLED, kept when it FAILS.
- `tensorboard/`: the service's TensorBoard scalars of every metrics event (kept).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "worker.log"
CHECKPOINTS = "checkpoints"
OUTPUT = "output"
POLICY = "policy"  # GRPO's policy before each sync upload
# Deleted when a job SUCCEEDS or is CANCELLED; a FAILED job keeps them for inspection.
SCRATCH = (CHECKPOINTS, OUTPUT, POLICY)
API_KEY_ENV = "TLM_TRAINER_WORKER_API_KEY"
# Under checkpoints/: {"step": N, ...}, replaced atomically once the online-RL resume state of
# step N is complete. TRL's checkpoint-N/ is complete once its trainer_state.json (written last)
# parses.
CHECKPOINT_MARKER = "latest.json"
TRL_STATE = "trainer_state.json"


@dataclass(frozen=True)
class WorkerJob:
    """The contents of job.json."""

    name: str
    team: str
    spec: dict[str, Any]
    device_plan: dict[str, Any]
    registry_address: str
    rollout_address: str
    reward_address: str
    cache_dir: str
    torch_threads: int = 0
    resume_step: int = 0  # the job's checkpoint_step: resume from checkpoints/checkpoint-{step}
    outage_timeout_s: float = 600.0  # how long online RL waits for a service that is down

    def write(self, folder: Path) -> None:
        (folder / JOB_FILE).write_text(json.dumps(self.__dict__, indent=1))

    @staticmethod
    def read(folder: Path) -> WorkerJob:
        return WorkerJob(**json.loads((folder / JOB_FILE).read_text()))


def saved_step(folder: Path) -> int:
    """The step of the last complete checkpoint in the job folder's `checkpoints/` (0: none),
    read from the checkpoints themselves: the events file may lack the last one when the worker
    died between writing it and reporting it."""
    checkpoints = folder / CHECKPOINTS
    steps = [0]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        steps.append(int(json.loads((checkpoints / CHECKPOINT_MARKER).read_text())["step"]))
    for path in checkpoints.glob(f"checkpoint-*/{TRL_STATE}"):
        number = path.parent.name.removeprefix("checkpoint-")
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # torn by a crash: incomplete
        if number.isdigit():
            steps.append(int(number))
    return max(steps)


class EventWriter:
    """Worker side: append one event per line, flushed so the service sees it at once."""

    def __init__(self, folder: Path) -> None:
        self._file = (folder / EVENTS_FILE).open("a", encoding="utf-8")

    def emit(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, "time": time.time(), **data}, default=_number)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class EventTailer:
    """Service side: the complete lines appended since the last read."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / EVENTS_FILE
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a partly written last line waits for the next read
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a torn line from a crash: skip it
        return events


def clean_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Finite numbers only (TRL logs strings and NaNs now and then)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
