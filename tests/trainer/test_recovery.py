"""A trainer that starts over jobs left by a previous process: RUNNING jobs without a
checkpoint fail, those with one go back to PENDING to resume, PENDING ones run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import grpc

from services.devtools.server_thread import ServerThread
from services.trainer.domain import Job, JobState, Method, Progress
from services.trainer.spec import JobSpec, validate
from services.trainer.store import JobStore, new_job_id
from services.trainer.supervisor import job_folder
from services.trainer.worker_protocol import (
    CHECKPOINT_MARKER,
    CHECKPOINTS,
    TRL_STATE,
    WorkerJob,
    saved_step,
)
from tests.trainer.conftest import Inputs, start_trainer, wait_for, watch
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc


def _seed(store: JobStore, inputs: Inputs, state: JobState, checkpoint: int = 0) -> str:
    spec = validate(JobSpec(Method.SFT, inputs.base, inputs.sft)).to_dict()
    job = Job(
        new_job_id(),
        "dev",
        spec,
        JobState.PENDING,
        {"device_type": "cpu", "precision": "fp32"},
        Progress(),
        datetime.now(UTC),
    )
    store.create(job)
    if state is not JobState.PENDING:
        store.transition("dev", job.job_id, state, "was running", checkpoint_step=checkpoint)
    return f"jobs/{job.job_id}"


async def test_restart_fails_resumes_and_requeues(
    stack: ServerThread, inputs: Inputs, tmp_path: Path
) -> None:
    (tmp_path / "trainer").mkdir()
    store = JobStore(f"sqlite:///{tmp_path / 'trainer' / 'jobs.db'}")
    lost = _seed(store, inputs, JobState.RUNNING)
    resumable = _seed(store, inputs, JobState.RUNNING, checkpoint=2)
    pending = _seed(store, inputs, JobState.PENDING)
    store.close()
    # The crash worker ends whatever it runs, which shows what was started again.
    trainer = start_trainer(tmp_path, stack.address, "tests.trainer.crash_worker")
    try:
        channel = grpc.aio.insecure_channel(trainer.address)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        job = await stub.GetTrainingJob(pb.GetTrainingJobRequest(name=lost))
        assert job.state == pb.TrainingJob.STATE_FAILED and "restarted" in job.error.message
        for name in (resumable, pending):
            job = await wait_for(stub, name, timeout=60)
            assert job.state == pb.TrainingJob.STATE_FAILED and "exit code 3" in job.error.message
        states = [
            e.state_change for e in await watch(stub, resumable) if e.HasField("state_change")
        ]
        assert [s.state for s in states] == [
            pb.TrainingJob.STATE_PENDING,
            pb.TrainingJob.STATE_RUNNING,
            pb.TrainingJob.STATE_PENDING,
            pb.TrainingJob.STATE_RUNNING,
            pb.TrainingJob.STATE_FAILED,
        ]
        assert "resuming from step 2" in states[2].message
        await channel.close()
    finally:
        trainer.stop()


async def test_resume_step_is_read_from_the_checkpoint_folder(
    stack: ServerThread, inputs: Inputs, tmp_path: Path
) -> None:
    """The worker died after completing the checkpoint of step 4 and before its event: the
    store says 2, the folder says 4 (the online-RL marker; a TRL checkpoint-6/ whose
    trainer_state.json is torn does not count). The job resumes from 4, and the worker is told
    so."""
    (tmp_path / "trainer").mkdir()
    store = JobStore(f"sqlite:///{tmp_path / 'trainer' / 'jobs.db'}")
    name = _seed(store, inputs, JobState.RUNNING, checkpoint=2)
    store.close()
    folder = job_folder(tmp_path / "trainer" / "jobs", ("dev", name.removeprefix("jobs/")))
    (folder / CHECKPOINTS / "checkpoint-6").mkdir(parents=True)
    (folder / CHECKPOINTS / "checkpoint-6" / TRL_STATE).write_text('{"global_st')
    (folder / CHECKPOINTS / CHECKPOINT_MARKER).write_text('{"step": 4, "state": "s.pt"}')
    assert saved_step(folder) == 4
    trainer = start_trainer(tmp_path, stack.address, "tests.trainer.crash_worker")
    try:
        channel = grpc.aio.insecure_channel(trainer.address)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        job = await wait_for(stub, name, timeout=60)
        states = [e.state_change for e in await watch(stub, name) if e.HasField("state_change")]
        await channel.close()
    finally:
        trainer.stop()
    assert "resuming from step 4" in states[2].message
    assert WorkerJob.read(folder).resume_step == 4
    assert job.state == pb.TrainingJob.STATE_FAILED and "exit code 3" in job.error.message
