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
        assert job.state == pb.TrainingJob.FAILED and "restarted" in job.error.message
        for name in (resumable, pending):
            job = await wait_for(stub, name, timeout=60)
            assert job.state == pb.TrainingJob.FAILED and "exit code 3" in job.error.message
        states = [
            e.state_change for e in await watch(stub, resumable) if e.HasField("state_change")
        ]
        assert [s.state for s in states] == [
            pb.TrainingJob.PENDING,
            pb.TrainingJob.RUNNING,
            pb.TrainingJob.PENDING,
            pb.TrainingJob.RUNNING,
            pb.TrainingJob.FAILED,
        ]
        assert "resuming from step 2" in states[2].message
        await channel.close()
    finally:
        trainer.stop()
