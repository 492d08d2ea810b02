"""Runs jobs in worker processes: a FIFO of pending jobs, at most `max_running` workers, each
watched by a task that tails its events file into the store and decides how the job ended.

A worker is `python -m services.trainer.worker <job folder>` in its own session, so a crash,
an OOM kill or a segfault never takes the service down. A worker killed by a signal before it
reported an outcome (no result, error or cancel: a SIGKILL, the OOM killer, a segfault) is
started again from its last checkpoint, at most `max_restarts` times per job, each restart a
job event; then the job FAILS. Where to resume is read from the checkpoint folder itself
(`saved_step`), not only from the checkpoint events, which a crash can leave one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from services.common.ids import team_dir
from services.trainer.distributed import launch_command
from services.trainer.domain import EventKind, JobError, JobState
from services.trainer.store import JobStore
from services.trainer.tensorboard_log import TensorBoardLog
from services.trainer.worker_protocol import (
    API_KEY_ENV,
    EVENTS_FILE,
    LOG_FILE,
    SCRATCH,
    EventTailer,
    WorkerJob,
    clean_metrics,
    saved_step,
)

log = structlog.get_logger("tlm.trainer.supervisor")
Key = tuple[str, str]  # (team, job_id)
DEFAULT_WORKER = "services.trainer.worker"
# What a worker inherits from the service's environment: never the services' API keys.
WORKER_ENV = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "VIRTUAL_ENV"})
WORKER_ENV_PREFIXES = (
    "CUDA_",
    "NVIDIA_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "OMP_",
    "MKL_",
    "PYTHON",
    "NCCL_",  # a torchrun group's collectives (NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, ...)
    "GLOO_",
    "TORCH_",
)


@dataclass(frozen=True)
class WorkerConfig:
    root: Path
    max_running: int
    module: str = DEFAULT_WORKER
    cancel_grace_s: float = 30.0
    poll_s: float = 0.2
    torch_threads: int = 0  # per worker; 0: torch's default
    api_key: str | None = None
    registry_address: str = ""
    rollout_address: str = ""
    reward_address: str = ""
    outage_timeout_s: float = 600.0
    max_restarts: int = 3  # per job: restarts of a worker killed by a signal


@dataclass
class _Outcome:
    """What the worker reported, folded as its events arrive."""

    result: dict[str, Any] | None = None
    error: JobError | None = None
    cancelled: bool = False
    last_log: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, store: JobStore, config: WorkerConfig, notify: Callable[[Key], None]):
        self.store = store
        self.config = config
        self.notify = notify
        self._queue: deque[Key] = deque()
        self._procs: dict[Key, subprocess.Popen[bytes]] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._cancel_deadline: dict[Key, float] = {}
        self._stopping = False
        # A resumed job redoes the steps after its checkpoint; their metrics are recorded.
        self._recorded_step: dict[Key, int] = {}
        # Each running job's metrics, also as TensorBoard event files in its folder.
        self._boards: dict[Key, TensorBoardLog] = {}

    # Lifecycle -----------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: jobs left RUNNING by a previous process resume from their last checkpoint
        or fail; CANCELLING ones are CANCELLED; PENDING ones are queued again."""
        for job in self.store.jobs_in([JobState.CANCELLING, JobState.RUNNING, JobState.PENDING]):
            key = (job.team, job.job_id)
            step = self._checkpoint(key) if job.state is JobState.RUNNING else 0
            if job.state is JobState.CANCELLING:
                self.store.transition(*key, JobState.CANCELLED, "the trainer restarted")
            elif job.state is JobState.RUNNING and step > 0:
                message = f"the trainer restarted; resuming from step {step}"
                self.store.transition(*key, JobState.PENDING, message)
                self._queue.append(key)
            elif job.state is JobState.RUNNING:
                error = JobError(
                    "ABORTED", "the trainer restarted while the job ran, before any checkpoint"
                )
                self.store.transition(*key, JobState.FAILED, error.message, error=error)
            else:
                self._queue.append(key)
        self._kick()

    async def stop(self) -> None:
        """Stop every worker (jobs stay RUNNING: the next start resumes or fails them) and
        start no queued job: those stay PENDING for the next start."""
        self._stopping = True
        procs = list(self._procs.values())
        for proc in procs:
            _signal(proc, signal.SIGKILL)
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(proc.wait) for proc in procs))

    # Scheduling ----------------------------------------------------------------------------

    def submit(self, team: str, job_id: str) -> None:
        self._queue.append((team, job_id))
        self._kick()

    def withdraw(self, team: str, job_id: str) -> bool:
        """Remove a pending job from the queue; False when it is not queued."""
        try:
            self._queue.remove((team, job_id))
        except ValueError:
            return False
        return True

    def cancel(self, team: str, job_id: str) -> None:
        """Ask a running worker to stop (SIGTERM); it is killed after cancel_grace_s."""
        key = (team, job_id)
        proc = self._procs.get(key)
        if proc is not None:
            _signal(proc, signal.SIGTERM)
            self._cancel_deadline[key] = time.monotonic() + self.config.cancel_grace_s

    @property
    def running(self) -> int:
        return len(self._tasks)

    def _kick(self) -> None:
        while not self._stopping and self._queue and len(self._tasks) < self.config.max_running:
            key = self._queue.popleft()
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    # One job -------------------------------------------------------------------------------

    async def _run(self, key: Key) -> None:
        try:
            if self.store.get(*key).state is not JobState.PENDING:
                # Cancelled between leaving the queue and starting: nothing to run.
                self._end(key, JobState.CANCELLED, "cancelled before it started")
                return
            restarts = 0
            while True:
                proc, tailer = self._spawn(key)
                outcome = await self._watch(key, proc, tailer)
                if not self._restart(key, proc.returncode, outcome, restarts):
                    break
                restarts += 1
            self._finish(key, proc.returncode, outcome)
            self._clean(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the supervisor itself failed: the job must not hang
            log.error("job_supervision_failed", job=key[1], exc_info=exc)
            error = JobError("INTERNAL", "the trainer could not run this job's worker")
            self._end(key, JobState.FAILED, error.message, error=error)
        finally:
            orphan = self._procs.pop(key, None)
            if orphan is not None and orphan.poll() is None:  # supervision failed or stopped
                _signal(orphan, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    orphan.wait(timeout=5)
            self._tasks.pop(key, None)
            self._cancel_deadline.pop(key, None)
            self._recorded_step.pop(key, None)
            board = self._boards.pop(key, None)
            if board is not None:
                board.close()
            self.notify(key)
            self._kick()

    def _spawn(self, key: Key) -> tuple[subprocess.Popen[bytes], EventTailer]:
        team, job_id = key
        job = self.store.get(team, job_id)
        folder = job_folder(self.config.root, key)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / EVENTS_FILE).exists():  # a resumed job: its old events are recorded
            shutil.move(folder / EVENTS_FILE, folder / f"events.{int(time.time())}.jsonl")
        WorkerJob(
            name=job.name,
            team=team,
            spec=job.spec,
            device_plan=job.device_plan,
            registry_address=self.config.registry_address,
            rollout_address=self.config.rollout_address,
            reward_address=self.config.reward_address,
            cache_dir=str(self.config.root / "cache"),
            torch_threads=self.config.torch_threads,
            resume_step=self._checkpoint(key),
            outage_timeout_s=self.config.outage_timeout_s,
        ).write(folder)
        env = worker_env(os.environ, self.config.api_key)
        with (folder / LOG_FILE).open("ab") as out:
            proc = subprocess.Popen(
                # One device: the worker; more: a torchrun group of workers (distributed.py).
                launch_command(self.config.module, folder, job.device_plan),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._procs[key] = proc
        self._recorded_step[key] = job.progress.step
        board = self._boards.pop(key, None)
        if board is not None:  # a restarted worker: a new board on the same folder
            board.close()
        self._boards[key] = TensorBoardLog(folder)
        self.store.transition(team, job_id, JobState.RUNNING, f"worker started (pid {proc.pid})")
        log.info("job_started", job=job_id, team=team, method=job.method.name, pid=proc.pid)
        self.notify(key)
        return proc, EventTailer(folder)

    async def _watch(
        self, key: Key, proc: subprocess.Popen[bytes], tailer: EventTailer
    ) -> _Outcome:
        outcome = _Outcome()
        while True:
            exited = proc.poll() is not None
            for event in tailer.read_new():
                self._record(key, event, outcome)
            if exited:
                return outcome
            deadline = self._cancel_deadline.get(key)
            if deadline is not None and time.monotonic() > deadline:
                _signal(proc, signal.SIGKILL)
            await asyncio.sleep(self.config.poll_s)

    def _checkpoint(self, key: Key) -> int:
        """The step the job resumes from: its folder's last complete checkpoint when a crash
        lost its event (the store is brought up to it), else the last one recorded."""
        recorded = self.store.get(*key).checkpoint_step
        step = saved_step(job_folder(self.config.root, key))
        if step > recorded:
            self.store.update(*key, checkpoint_step=step)
        return max(step, recorded)

    def _restart(self, key: Key, returncode: int | None, outcome: _Outcome, restarts: int) -> bool:
        """Whether to start the worker again: a signal killed it before it reported how the job
        ended (an exit of its own is its answer), nobody asked it to stop, and the job has
        restarts left. Records the restart."""
        job = self.store.get(*key)
        if outcome.result or outcome.error or outcome.cancelled or job.cancel_requested:
            return False
        if returncode is None or returncode >= 0:
            return False
        if self._stopping or job.state is not JobState.RUNNING:
            return False
        died = _death(returncode)
        if restarts >= self.config.max_restarts:
            again = f" again after {restarts} restarts" if restarts else ""
            outcome.error = JobError(
                "ABORTED",
                f"the worker {died}{again} (max_restarts {self.config.max_restarts}); see its log",
            )
            return False
        step = self._checkpoint(key)
        where = f"from step {step}" if step else "from the start (no checkpoint yet)"
        message = (
            f"the worker {died}; restarting it {where} "
            f"(restart {restarts + 1} of {self.config.max_restarts})"
        )
        self.store.transition(*key, JobState.PENDING, message)
        log.warning("job_worker_restarted", job=key[1], team=key[0], returncode=returncode)
        self.notify(key)
        return True

    def _record(self, key: Key, event: dict[str, Any], outcome: _Outcome) -> None:
        kind = event.get("kind")
        at = _worker_time(event)
        if kind == "started":
            self.store.update(*key, total_steps=int(event.get("total_steps", 0)))
            message = f"training started: {event.get('total_steps', 0)} steps"
            self.store.append(*key, EventKind.LOG, {"level": "info", "message": message})
        elif kind == "metrics":
            step, values = int(event["step"]), clean_metrics(event.get("values", {}))
            if step <= self._recorded_step.get(key, 0):
                return
            data = {"step": step, "epoch": float(event.get("epoch", 0.0)), "values": values}
            self.store.append(*key, EventKind.METRICS, data, at)
            self._boards[key].scalars(step, values)
        elif kind == "checkpoint":
            data = {"step": int(event["step"]), "policy_revision": event.get("policy_revision", "")}
            self.store.append(*key, EventKind.CHECKPOINT, data, at)
        elif kind == "log":
            data = {"level": event.get("level", "info"), "message": str(event.get("message", ""))}
            self.store.append(*key, EventKind.LOG, data, at)
        elif kind == "result":
            outcome.result = {
                "output_model_revision": event.get("output_model_revision", ""),
                "metrics": clean_metrics(event.get("metrics", {})),
            }
        elif kind == "error":
            outcome.error = JobError(event.get("code", "INTERNAL"), str(event.get("message", "")))
        elif kind == "cancelled":
            outcome.cancelled = True
        self.notify(key)

    def _finish(self, key: Key, returncode: int | None, outcome: _Outcome) -> None:
        job = self.store.get(*key)
        if outcome.result is not None and outcome.error is None:
            result = outcome.result
            self.store.append(*key, EventKind.RESULT, result)
            self._end(
                key,
                JobState.SUCCEEDED,
                "finished",
                output_model_revision=result["output_model_revision"],
                final_metrics=result["metrics"],
            )
        elif job.cancel_requested:
            self._end(key, JobState.CANCELLED, "cancelled; the worker has exited")
        else:
            error = outcome.error or JobError(
                "INTERNAL", f"the worker process died (exit code {returncode}); see its log"
            )
            self._end(key, JobState.FAILED, error.message, error=error)

    def _clean(self, key: Key) -> None:
        """A job that SUCCEEDED (its result is in the registry) or was CANCELLED needs neither
        its checkpoints nor its output copy; a FAILED one keeps them for inspection."""
        if self.store.get(*key).state in (JobState.SUCCEEDED, JobState.CANCELLED):
            folder = job_folder(self.config.root, key)
            for name in SCRATCH:
                shutil.rmtree(folder / name, ignore_errors=True)

    def _end(self, key: Key, state: JobState, message: str, **fields: Any) -> None:
        job = self.store.get(*key)
        if job.state.terminal:
            return
        self.store.transition(*key, state, message, **fields)
        log.info("job_ended", job=key[1], team=key[0], state=state.name, message=message)


def job_folder(root: Path, key: Key) -> Path:
    """`<root>/<team>/<job_id>`; the team is checked again (`team_dir`): it came from a header."""
    team, job_id = key
    return team_dir(root, team) / job_id


def _death(returncode: int | None) -> str:
    """How a worker ended, in words: "was killed by SIGKILL", "exited with code 1"."""
    with contextlib.suppress(ValueError, TypeError):
        return f"was killed by {signal.Signals(-(returncode or 0)).name}"
    return f"was killed (exit code {returncode})"


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the worker's whole session (dataloader processes too)


def worker_env(environ: Mapping[str, str], api_key: str | None) -> dict[str, str]:
    """The allowlisted part of `environ`, plus the worker's own service key.

    >>> env = worker_env({"PATH": "/bin", "HF_HOME": "/h", "TLM_REGISTRY_API_KEYS": "k"}, "s")
    >>> sorted(env.items())  # doctest: +NORMALIZE_WHITESPACE
    [('HF_HOME', '/h'), ('PATH', '/bin'), ('PYTHONUNBUFFERED', '1'),
     ('TLM_TRAINER_WORKER_API_KEY', 's'), ('TOKENIZERS_PARALLELISM', 'false')]
    """
    env = {k: v for k, v in environ.items() if k in WORKER_ENV or k.startswith(WORKER_ENV_PREFIXES)}
    env |= {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


def _worker_time(event: Mapping[str, Any]) -> datetime | None:
    """When the worker says it happened (its clock, to the microsecond): the events file is
    read every `poll_s`, so the service's own clock would round step times to that poll."""
    stamp = event.get("time")
    if not isinstance(stamp, int | float) or not math.isfinite(stamp):
        return None
    return datetime.fromtimestamp(stamp, UTC)
