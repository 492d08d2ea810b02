"""A job's worker process: `python -m services.trainer.worker <job folder>`.

Reads job.json, runs the method's runner, reports through events.jsonl and exits. Any error
becomes an `error` event (the job FAILS); SIGTERM asks it to stop at the next step: the job is
CANCELLED when the service wrote the folder's cancel file first (`Workers.stop`); a SIGTERM from
anyone else (a Kubernetes eviction, preemption or drain) is no cancel: the worker dies by it, and
the supervisor restarts the job from its last checkpoint as after any kill. It dies with the
service process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.clients.registry import RegistryClient
from services.common.errors import NotImplementedYet, TlmError, status_code_for
from services.trainer.distributed import (
    CANCEL_FILE,
    RankEvents,
    die_by,
    end_rank,
    exit_status,
    world_size,
)
from services.trainer.domain import Method
from services.trainer.methods import METHODS
from services.trainer.spec import JobSpec
from services.trainer.worker_io import Cancelled, WorkerContext
from services.trainer.worker_protocol import API_KEY_ENV, EventWriter, WorkerJob

Runner = Callable[[WorkerContext], Awaitable[dict[str, Any]]]
# The module holding each method's `run`, from the method table; imported lazily, so EVALUATE
# and GRPO never load TRL.
RUNNERS: dict[Method, str] = {m: d.runner for m, d in METHODS.items() if d.implemented}
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Not Linux: no such call, and an orphan runs on until it ends.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def _run(
    job: WorkerJob, folder: Path, events: EventWriter, stop: threading.Event
) -> dict[str, Any]:
    spec = JobSpec.from_dict(job.spec)
    module = RUNNERS.get(spec.method)
    if module is None:
        raise NotImplementedYet(f"{spec.method.name} is not implemented yet")
    runner: Runner = importlib.import_module(module).run
    # The channel is made here, on the loop that uses it.
    registry = RegistryClient(job.registry_address, api_key=os.environ.get(API_KEY_ENV) or None)
    try:
        return await runner(WorkerContext(job, spec, folder, events, stop, registry))
    finally:
        await registry.close()


def _status(exc: Exception) -> tuple[str, str]:
    """(grpc status code name, message) for an error that ends the job."""
    if isinstance(exc, TlmError):
        return status_code_for(exc).name, exc.message
    return "INTERNAL", f"{type(exc).__name__}: {exc}"


def main(folder: Path) -> int:
    _die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    job = WorkerJob.read(folder)
    events = RankEvents(folder)  # a torchrun group: rank 0 reports, the others their errors
    failed = evicted = False
    if job.torch_threads:
        import torch

        torch.set_num_threads(max(1, job.torch_threads // world_size()))
    try:
        # No stop check here: runners check at their cut-off points (never after an upload
        # started), and a result that exists has been committed to the registry.
        result = asyncio.run(_run(job, folder, events, stop))
        events.emit("result", **result)
    except Cancelled:
        # In a group the ranks' events say the same (RankEvents); torchrun's agent decides.
        evicted = world_size() == 1 and not (folder / CANCEL_FILE).exists()
        if evicted:
            message = (
                "stopped by SIGTERM without a cancel (an eviction?): restart from a checkpoint"
            )
            events.emit("log", level="warning", message=message)
        else:
            events.emit("cancelled")
    except Exception as exc:
        traceback.print_exc()
        code, message = _status(exc)
        events.emit("error", code=code, message=message)
        failed = True
    finally:
        events.close()
    if evicted:
        return die_by(signal.SIGTERM)
    return exit_status(failed)


if __name__ == "__main__":
    end_rank(main(Path(sys.argv[1])))
