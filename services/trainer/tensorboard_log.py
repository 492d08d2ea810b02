"""A job's step metrics as TensorBoard event files (`<job folder>/tensorboard/`), one scalar
per metric name per step, as TRL users read them (`tensorboard --logdir <job folder>`).

The service writes them as it records each metrics event, so they are there for every method
and every worker, and they survive the job (they are not scratch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("tlm.trainer.tensorboard")
TENSORBOARD = "tensorboard"  # the folder in the job's folder
PREFIXES = ("eval", "test")  # `eval_loss` -> `eval/loss`; anything else is `train/...`


def tag(metric: str) -> str:
    """A metric's TensorBoard tag, as transformers' TensorBoardCallback names TRL's logs.

    >>> [tag(m) for m in ("loss", "reward_mean", "eval_loss")]
    ['train/loss', 'train/reward_mean', 'eval/loss']
    """
    for prefix in PREFIXES:
        if metric.startswith(prefix + "_"):
            return f"{prefix}/{metric.removeprefix(prefix + '_')}"
    return f"train/{metric}"


class TensorBoardLog:
    """One event file per worker run (a resumed job adds a file to the same folder).

    A failure to write (disk full, permissions) is logged once and ends this log, never the job.
    """

    def __init__(self, job_folder: Path) -> None:
        self._folder = job_folder / TENSORBOARD
        self._writer: Any = None
        self._failed = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Append `values` at `step` and flush, so a running TensorBoard sees them at once."""
        if self._failed or not values:
            return
        try:
            self._write(step, values)
        except (OSError, RuntimeError) as exc:
            self._failed = True
            log.warning("tensorboard_write_failed", folder=str(self._folder), error=str(exc))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, step: int, values: dict[str, float]) -> None:
        # Imported here: half a second that only a service that runs jobs pays, once.
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._folder.mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(self._folder))
        summary = Summary(
            value=[
                Summary.Value(tag=tag(name), simple_value=v) for name, v in sorted(values.items())
            ]
        )
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()
