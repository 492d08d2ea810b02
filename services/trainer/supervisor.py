"""Runs jobs in worker processes: a FIFO of pending jobs, at most `max_running` workers, each
watched by a task that tails its events file into the store and decides how the job ended.

A worker is `python -m services.trainer.worker <job folder>` in its own session, so a crash,
an OOM kill or a segfault never takes the service down; where it runs is the launcher's
(`launchers.py`: this host, or an indexed Job on Kubernetes, `kubernetes_jobs.py`). A worker
killed by a signal before it reported an outcome (no result, error or cancel: a SIGKILL, the
OOM killer, a segfault) is started again from its last checkpoint, at most `max_restarts` times
per job, each restart a job event; then the job FAILS. Where to resume is read from the
checkpoint folder itself (`saved_step`), not only from the checkpoint events, which a crash can
leave one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from services.common.ids import team_dir
from services.trainer.distributed import CANCEL_FILE, RANK_ERRORS
from services.trainer.domain import EventKind, JobError, JobState
from services.trainer.launchers import Exit, Launcher, LaunchFailed, LocalLauncher, Workers
from services.trainer.store import JobStore
from services.trainer.tensorboard_log import TensorBoardLog
from services.trainer.worker_protocol import (
    API_KEY_ENV,
    EVENTS_FILE,
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
    def __init__(
        self,
        store: JobStore,
        config: WorkerConfig,
        notify: Callable[[Key], None],
        launcher: Launcher | None = None,
    ):
        """`launcher`: where workers run; by default this host (`config.module`, `worker_env`)."""
        self.store = store
        self.config = config
        self.notify = notify
        self.launcher = launcher or local_launcher(config)
        self._queue: deque[Key] = deque()
        self._workers: dict[Key, Workers] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._cancel_deadline: dict[Key, float] = {}
        self._stopping = False
        # A resumed job redoes the steps after its checkpoint; their metrics are recorded.
        self._recorded_step: dict[Key, int] = {}
        # Each running job's metrics, also as TensorBoard event files in its folder.
        self._boards: dict[Key, TensorBoardLog] = {}
        self._forgetting: set[asyncio.Task[None]] = set()

    # Lifecycle -----------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: jobs left RUNNING by a previous process resume from their last checkpoint
        or fail; CANCELLING ones are CANCELLED; PENDING ones are queued again. What the launcher
        still runs for the jobs not resumed (a Kubernetes Job) is removed (`Launcher.forget`)."""
        ended: list[str] = []
        for job in self.store.jobs_in([JobState.CANCELLING, JobState.RUNNING, JobState.PENDING]):
            key = (job.team, job.job_id)
            step = self._checkpoint(key) if job.state is JobState.RUNNING else 0
            if job.state is JobState.CANCELLING:
                self.store.transition(*key, JobState.CANCELLED, "the trainer restarted")
                ended.append(job.job_id)
            elif job.state is JobState.RUNNING and step > 0:
                message = f"the trainer restarted; resuming from step {step}"
                self.store.transition(*key, JobState.PENDING, message)
                self._queue.append(key)
            elif job.state is JobState.RUNNING:
                error = JobError(
                    "ABORTED", "the trainer restarted while the job ran, before any checkpoint"
                )
                self.store.transition(*key, JobState.FAILED, error.message, error=error)
                ended.append(job.job_id)
            else:
                self._queue.append(key)
        if ended:
            task = asyncio.get_running_loop().create_task(self._forget(ended))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)
        self._kick()

    async def _forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            try:
                await self.launcher.forget(job_id)
            except Exception as exc:  # best effort: a Kubernetes Job's TTL removes it in the end
                log.warning("job_workers_not_forgotten", job=job_id, error=str(exc))

    async def stop(self) -> None:
        """Stop every worker (jobs stay RUNNING: the next start resumes or fails them) and
        start no queued job: those stay PENDING for the next start."""
        self._stopping = True
        running = list(self._workers.values())
        for workers in running:
            workers.kill()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await asyncio.gather(*(workers.release() for workers in running), return_exceptions=True)
        await asyncio.gather(*self._forgetting, return_exceptions=True)

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
        workers = self._workers.get(key)
        if workers is not None:
            workers.stop()
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
            restarts, step = 0, self._checkpoint(key)
            while True:
                workers, tailer = await self._spawn(key, step)
                outcome, ended = await self._watch(key, workers, tailer)
                await workers.release()
                self._workers.pop(key, None)
                resume = self._restart(key, ended, outcome, restarts)
                if resume is None:
                    break
                restarts, step = restarts + 1, resume
            self._finish(key, ended, outcome)
            self._clean(key)
        except asyncio.CancelledError:
            raise
        except LaunchFailed as exc:  # e.g. the cluster refused the Job: the job says why
            log.error("job_launch_failed", job=key[1], message=exc.error.message)
            self._end(key, JobState.FAILED, exc.error.message, error=exc.error)
        except Exception as exc:  # the supervisor itself failed: the job must not hang
            log.error("job_supervision_failed", job=key[1], exc_info=exc)
            error = JobError("INTERNAL", "the trainer could not run this job's worker")
            self._end(key, JobState.FAILED, error.message, error=error)
        finally:
            orphan = self._workers.pop(key, None)
            if orphan is not None:  # supervision failed, or the trainer is stopping
                orphan.kill()
                if not self._stopping:  # stop() releases what it killed
                    with contextlib.suppress(Exception):
                        await orphan.release()
            self._tasks.pop(key, None)
            self._cancel_deadline.pop(key, None)
            self._recorded_step.pop(key, None)
            board = self._boards.pop(key, None)
            if board is not None:
                board.close()
            self.notify(key)
            self._kick()

    async def _spawn(self, key: Key, step: int) -> tuple[Workers, EventTailer]:
        """Start the job's workers, resuming from checkpoint `step` (0: from the start)."""
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
            resume_step=step,
            outage_timeout_s=self.config.outage_timeout_s,
        ).write(folder)
        # A previous attempt's cancel and rank errors; here, not in the workers: a worker that
        # starts late must not erase a cancel asked for since (distributed.py).
        (folder / CANCEL_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder / RANK_ERRORS, ignore_errors=True)
        # One device: the worker; more: a torchrun group of workers (distributed.py).
        workers = await self._start(job_id, folder, job.device_plan)
        self._workers[key] = workers
        self._recorded_step[key] = job.progress.step
        board = self._boards.pop(key, None)
        if board is not None:  # a restarted worker: a new board on the same folder
            board.close()
        self._boards[key] = TensorBoardLog(folder)
        self.store.transition(team, job_id, JobState.RUNNING, f"worker started ({workers.label})")
        log.info("job_started", job=job_id, team=team, method=job.method.name, at=workers.label)
        self.notify(key)
        return workers, EventTailer(folder)

    async def _start(self, job_id: str, folder: Path, plan: dict[str, Any]) -> Workers:
        """The launcher's start, which `stop()` cannot interrupt halfway (a Kubernetes Job being
        created in a thread): if the trainer stops meanwhile, what was started is removed."""
        starting = asyncio.ensure_future(self.launcher.start(job_id, folder, plan))
        try:
            workers = await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                workers = await starting
                workers.kill()
                await workers.release()
            raise
        if self._stopping:  # started as stop() began: nobody would release these
            workers.kill()
            await workers.release()
            raise asyncio.CancelledError
        return workers

    async def _watch(
        self, key: Key, workers: Workers, tailer: EventTailer
    ) -> tuple[_Outcome, Exit]:
        outcome = _Outcome()
        while True:
            ended = await workers.poll()
            for event in tailer.read_new():
                self._record(key, event, outcome)
            if ended is not None:
                return outcome, ended
            deadline = self._cancel_deadline.get(key)
            if deadline is not None and time.monotonic() > deadline:
                workers.kill()
            await asyncio.sleep(self.config.poll_s)

    def _checkpoint(self, key: Key) -> int:
        """The step the job resumes from: its folder's last complete checkpoint when a crash
        lost its event (the store is brought up to it), else the last one recorded."""
        recorded = self.store.get(*key).checkpoint_step
        step = saved_step(job_folder(self.config.root, key))
        if step > recorded:
            self.store.update(*key, checkpoint_step=step)
        return max(step, recorded)

    def _restart(self, key: Key, ended: Exit, outcome: _Outcome, restarts: int) -> int | None:
        """The checkpoint step to start the worker again from, or None: only when a signal killed
        it before it reported how the job ended (an exit of its own is its answer), nobody asked
        it to stop, and the job has restarts left. Records the restart."""
        job = self.store.get(*key)
        if outcome.result or outcome.error or outcome.cancelled or job.cancel_requested:
            return None
        if ended.error or ended.returncode is None or ended.returncode >= 0:
            return None
        if self._stopping or job.state is not JobState.RUNNING:
            return None
        died = ended.how
        if restarts >= self.config.max_restarts:
            again = f" again after {restarts} restarts" if restarts else ""
            outcome.error = JobError(
                "ABORTED",
                f"the worker {died}{again} (max_restarts {self.config.max_restarts}); see its log",
            )
            return None
        step = self._checkpoint(key)
        where = f"from step {step}" if step else "from the start (no checkpoint yet)"
        message = (
            f"the worker {died}; restarting it {where} "
            f"(restart {restarts + 1} of {self.config.max_restarts})"
        )
        self.store.transition(*key, JobState.PENDING, message)
        log.warning("job_worker_restarted", job=key[1], team=key[0], returncode=ended.returncode)
        self.notify(key)
        return step

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

    def _finish(self, key: Key, ended: Exit, outcome: _Outcome) -> None:
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
            error = (
                outcome.error
                or ended.error
                or JobError(
                    "INTERNAL",
                    f"the worker process died (exit code {ended.returncode}); see its log",
                )
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


def local_launcher(config: WorkerConfig) -> LocalLauncher:
    """Workers on this host: `config.module` with the allowlisted environment (`worker_env`)."""
    return LocalLauncher(config.module, lambda: worker_env(os.environ, config.api_key))


def job_folder(root: Path, key: Key) -> Path:
    """`<root>/<team>/<job_id>`; the team is checked again (`team_dir`): it came from a header."""
    team, job_id = key
    return team_dir(root, team) / job_id


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
