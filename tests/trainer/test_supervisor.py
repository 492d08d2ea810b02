"""The supervisor with scripted worker processes: shutdown starts nothing queued and leaves
no process behind, a failing supervision kills its worker, and scratch folders go away with
a job that succeeded."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.trainer.distributed import CANCEL_FILE
from services.trainer.domain import EventKind, Job, JobState, Method, Progress
from services.trainer.launchers import LocalWorkers
from services.trainer.spec import JobSpec, validate
from services.trainer.store import JobStore, new_job_id
from services.trainer.supervisor import Key, Supervisor, WorkerConfig, local_launcher
from services.trainer.worker_protocol import EVENTS_FILE, SCRATCH, WorkerJob
from tests.waiting import until

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


def _create(store: JobStore, script: str) -> Key:
    spec = validate(JobSpec(Method.SFT, BASE, DATA, output_model=f"models/{script}"))
    job = Job(
        new_job_id(), "a", spec.to_dict(), JobState.PENDING, {}, Progress(), datetime.now(UTC)
    )
    store.create(job)
    return ("a", job.job_id)


def _supervisor(store: JobStore, root: Path, max_running: int = 1) -> Supervisor:
    config = WorkerConfig(
        root=root, max_running=max_running, module="tests.trainer.scripted_worker", poll_s=0.05
    )
    return Supervisor(store, config, lambda key: None)


def _spawned(supervisor: Supervisor) -> list[subprocess.Popen[bytes]]:
    """Record every worker process the supervisor starts."""
    procs: list[subprocess.Popen[bytes]] = []
    start = supervisor.launcher.start

    async def recording(*args: Any) -> Any:
        workers = await start(*args)
        assert isinstance(workers, LocalWorkers)
        procs.append(workers.proc)
        return workers

    supervisor.launcher.start = recording  # type: ignore[method-assign, assignment]
    return procs


async def test_stop_kills_running_workers_and_starts_no_queued_job(
    store: JobStore, tmp_path: Path
) -> None:
    supervisor = _supervisor(store, tmp_path / "jobs")
    procs = _spawned(supervisor)
    running, queued = _create(store, "sleep"), _create(store, "sleep")
    supervisor.submit(*running)
    supervisor.submit(*queued)
    await until(lambda: store.get(*running).state is JobState.RUNNING)
    await supervisor.stop()
    await asyncio.sleep(0.3)  # a task started during shutdown would run now
    assert len(procs) == 1 and procs[0].poll() is not None  # killed and reaped
    assert store.get(*running).state is JobState.RUNNING  # the next start resumes or fails it
    assert store.get(*queued).state is JobState.PENDING and supervisor.running == 0


async def test_a_failing_supervision_fails_the_job_and_kills_its_worker(
    store: JobStore, tmp_path: Path
) -> None:
    supervisor = _supervisor(store, tmp_path / "jobs")
    procs = _spawned(supervisor)

    def broken(*args: Any) -> None:
        raise RuntimeError("tailing failed")

    supervisor._record = broken  # type: ignore[method-assign]
    key = _create(store, "sleep")
    supervisor.submit(*key)
    await until(lambda: store.get(*key).state.terminal)
    job = store.get(*key)
    assert job.state is JobState.FAILED and job.error and job.error.code == "INTERNAL"
    await until(lambda: supervisor.running == 0)
    assert procs[0].poll() is not None


async def test_a_succeeded_job_leaves_no_scratch_folders(store: JobStore, tmp_path: Path) -> None:
    supervisor = _supervisor(store, tmp_path / "jobs")
    key = _create(store, "succeed")
    supervisor.submit(*key)
    await until(lambda: store.get(*key).state.terminal and supervisor.running == 0)
    assert store.get(*key).state is JobState.SUCCEEDED
    folder = tmp_path / "jobs" / key[0] / key[1]
    assert (folder / "job.json").exists()
    assert not [name for name in SCRATCH if (folder / name).exists()]


async def test_a_resumed_job_records_each_step_once(store: JobStore, tmp_path: Path) -> None:
    key = _create(store, "resume")
    store.transition(*key, JobState.RUNNING, "first run")
    for step in (4, 5):  # checkpoint at 4, then step 5 logged before the crash
        store.append(*key, EventKind.METRICS, {"step": step, "epoch": 0.0, "values": {}})
    store.append(*key, EventKind.CHECKPOINT, {"step": 4})
    store.transition(*key, JobState.PENDING, "restarted")
    supervisor = _supervisor(store, tmp_path / "jobs")
    supervisor.submit(*key)
    await until(lambda: store.get(*key).state.terminal and supervisor.running == 0)
    steps = [e.data["step"] for e in store.events(*key, 0) if e.kind is EventKind.METRICS]
    assert steps == [4, 5, 6]
    job_file = json.loads((tmp_path / "jobs" / key[0] / key[1] / "job.json").read_text())
    assert job_file["resume_step"] == 4


async def test_stop_writes_the_cancel_file_before_it_signals(
    store: JobStore, tmp_path: Path
) -> None:
    """The file is what makes a SIGTERM a cancel (distributed.py): a signal from anyone else,
    a Kubernetes eviction say, is not one."""
    key = _create(store, "sleep")
    folder = tmp_path / "job"
    folder.mkdir()
    job = store.get(*key)
    WorkerJob(job.name, job.team, job.spec, {}, "", "", "", str(tmp_path)).write(folder)
    workers = await local_launcher(_supervisor(store, tmp_path).config).start(key[1], folder, {})
    assert isinstance(workers, LocalWorkers)
    await until(lambda: (folder / EVENTS_FILE).exists())  # the worker runs
    assert not (folder / CANCEL_FILE).exists()
    workers.stop()
    assert (folder / CANCEL_FILE).exists()
    await workers.release()
    assert workers.proc.returncode == -signal.SIGTERM
