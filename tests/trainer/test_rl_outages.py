"""Online RL through outages, end to end: the reward and rollout services run in servers of
their own on fixed ports, are stopped in the middle of a GRPO job and started again on the same
port; the job waits (job events, not a failure) and finishes every step once. A service down
for longer than the trainer's outage_timeout_s fails the job naming it. A worker killed with
SIGKILL is started again from its last checkpoint, up to max_restarts.

The tiny model's steps are too quick to pick the moment of an outage, so the worker is paused
(SIGSTOP) when it reports a step, the reward service stopped, and the worker let go: its next
call to it is the one that finds it down. The rollout service is stopped while the job waits
for the reward, so the job finds it down as soon as the reward is back."""

from __future__ import annotations

import contextlib
import signal
import socket
from pathlib import Path
from typing import Any, ClassVar

import grpc
import psutil
import pytest

from services.devtools.server_thread import ServerThread
from services.reward import app as reward_app
from services.reward.settings import RewardSettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from services.trainer.supervisor import job_folder
from services.trainer.worker_protocol import EventTailer, saved_step
from tests.trainer.conftest import (
    Inputs,
    paused_when,
    push_vowels,
    reported,
    spec,
    start_trainer,
    wait_for,
    watch,
    worker_events,
)
from tests.waiting import until
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
GROUP = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Restartable:
    """One service alone in a server on a fixed port, against the stack's registry."""

    APPS: ClassVar[dict[str, tuple[Any, Any]]] = {
        "reward": (reward_app, RewardSettings),
        "rollout": (rollout_app, RolloutSettings),
    }

    def __init__(self, service: str, data_dir: Path, registry: str) -> None:
        module, settings_cls = self.APPS[service]
        self.port = free_port()
        self.settings = settings_cls.model_validate(
            {
                "host": "127.0.0.1",
                "port": self.port,
                "data_dir": data_dir,
                "insecure_dev": True,
                "registry_address": registry,
            }
        )
        self.module = module
        self.server: ServerThread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Restartable:
        settings = self.settings
        self.server = ServerThread(lambda: [self.module.binding(settings)], settings).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=30)  # calls in flight finish; new ones find it down
            self.server = None


@pytest.fixture(scope="module")
async def vowels(stack: ServerThread, inputs: Inputs) -> str:
    return await push_vowels(stack, "evaluators/vowels-outage", "outage-vowels")


def grpo_spec(inputs: Inputs, evaluator: str, steps: int, save_every: int = 0) -> Any:
    return spec(
        pb.METHOD_GRPO,
        inputs.base,
        inputs.prompts,
        evaluator=evaluator,
        tuning=pb.Tuning(lora=pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        output_model="models/tiny-grpo-outage",
        training=pb.TrainingParams(
            max_steps=steps,
            per_device_batch_size=2,
            log_every=1,
            learning_rate=1e-2,
            save_every=save_every,
        ),
        grpo=pb.GrpoParams(
            num_generations=GROUP, sampling={"max_tokens": 6, "seed": 3, "temperature": 0.7}
        ),
    )


def worker_of(folder: Path) -> list[psutil.Process]:
    """The job's worker (a child of this process: the trainer runs in its thread), or none."""
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(folder) in process.cmdline():
                return [process]
    return []


async def paused_after(folder: Path, kind: str, step: int) -> psutil.Process:
    """The job's worker, stopped (SIGSTOP) once it has reported a `kind` event (metrics,
    checkpoint) of step `step` or later."""
    (worker,) = await paused_when(
        lambda: worker_of(folder),
        lambda _: reported(folder, kind, step),
        f"{kind} of step {step}",
    )
    return worker


async def noted(folder: Path, text: str, times: int = 1) -> None:
    """Once the worker has logged `times` job events holding `text` (the file read on from
    where the last poll stopped)."""
    tail, count = EventTailer(folder), 0

    def enough() -> bool:
        nonlocal count
        count += sum(text in str(e.get("message", "")) for e in tail.read_new())
        return count >= times

    await until(enough, timeout=240, what=f"{text} x{times}")


def by_step(events: list[pb.JobEvent]) -> list[int]:
    return [e.metrics.step for e in events if e.HasField("metrics")]


def messages(events: list[pb.JobEvent]) -> list[str]:
    return [e.log.message for e in events if e.HasField("log")]


async def test_a_grpo_job_waits_through_reward_and_rollout_outages(
    stack: ServerThread, inputs: Inputs, vowels: str, tmp_path: Path
) -> None:
    steps = 6
    reward = Restartable("reward", tmp_path / "reward", stack.address).start()
    rollout = Restartable("rollout", tmp_path / "rollout", stack.address).start()
    trainer = start_trainer(
        tmp_path / "trainer-data",
        stack.address,
        "services.trainer.worker",
        rollout_address=rollout.address,
        reward_address=reward.address,
        outage_timeout_s=240,
    )
    try:
        channel = grpc.aio.insecure_channel(trainer.address)
        stub = Stub(channel)
        create = pb.CreateTrainingJobRequest(spec=grpo_spec(inputs, vowels, steps))
        name = (await stub.CreateTrainingJob(create)).name
        root = tmp_path / "trainer-data" / "trainer" / "jobs"
        folder = job_folder(root, ("dev", name.removeprefix("jobs/")))
        worker = await paused_after(folder, "metrics", 1)
        reward.stop()
        worker.resume()
        await noted(folder, f"waiting for reward at {reward.address}")
        # The job waits for the reward and calls nothing else: the rollout stops with no call
        # in flight, and the job's next call to it (the push of the step just scored, which
        # finds the restarted rollout without the policy's base) finds it down.
        rollout.stop()
        reward.start()  # the same port
        await noted(folder, f"reward at {reward.address} answered again")
        await noted(folder, f"waiting for rollout at {rollout.address}")
        assert not any(e["kind"] == "error" for e in worker_events(folder))
        rollout.start()
        back = f"rollout at {rollout.address} answered again"
        await noted(folder, back)
        # Down again between steps: the next step's Generate finds it down (or, if the worker
        # got that far in the poll it was let go, the push after it).
        done = max(e["step"] for e in worker_events(folder) if e["kind"] == "metrics")
        worker = await paused_after(folder, "metrics", done + 1)
        rollout.stop()
        worker.resume()
        await noted(folder, f"waiting for rollout at {rollout.address}", times=2)
        rollout.start()
        await noted(folder, back, times=2)
        job = await wait_for(stub, name, timeout=300)
        events = await watch(stub, name)
        await channel.close()
    finally:
        trainer.stop()
        reward.stop()
        rollout.stop()
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error.message
    assert by_step(events) == list(range(1, steps + 1))  # every step once, none lost
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states == [
        pb.TrainingJob.STATE_PENDING,
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_SUCCEEDED,
    ]
    logs = messages(events)
    for kind, service in (("reward", reward), ("rollout", rollout)):
        assert any(m.startswith(f"waiting for {kind} at {service.address}") for m in logs)
    warnings = [e.log.message for e in events if e.HasField("log") and e.log.level == "warning"]
    assert any("waiting for reward" in m for m in warnings)


async def test_a_service_down_past_the_outage_timeout_fails_the_job_naming_it(
    stack: ServerThread, inputs: Inputs, vowels: str, tmp_path: Path
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # no reward service listens there
    trainer = start_trainer(
        tmp_path,
        stack.address,
        "services.trainer.worker",
        rollout_address=stack.address,
        reward_address=nobody,
        outage_timeout_s=2,
    )
    try:
        channel = grpc.aio.insecure_channel(trainer.address)
        stub = Stub(channel)
        create = pb.CreateTrainingJobRequest(spec=grpo_spec(inputs, vowels, 2))
        name = (await stub.CreateTrainingJob(create)).name
        job = await wait_for(stub, name, timeout=240)
        events = await watch(stub, name)
        await channel.close()
    finally:
        trainer.stop()
    assert job.state == pb.TrainingJob.STATE_FAILED
    assert job.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert f"the reward service at {nobody} was unreachable" in job.error.message
    assert "outage_timeout_s (2 s)" in job.error.message
    assert any(m.startswith(f"waiting for reward at {nobody}") for m in messages(events))
    assert by_step(events) == []


@pytest.mark.parametrize("max_restarts", [2, 0])
async def test_a_killed_worker_is_restarted_from_its_checkpoint(
    stack: ServerThread, inputs: Inputs, vowels: str, tmp_path: Path, max_restarts: int
) -> None:
    """SIGKILL after the checkpoint of step 2 of 5: with restarts left the worker starts again
    from step 2 (a job event says so) and the job finishes every step once; with
    max_restarts 0 the job fails saying how the worker died."""
    steps = 5
    trainer = start_trainer(
        tmp_path,
        stack.address,
        "services.trainer.worker",
        rollout_address=stack.address,
        reward_address=stack.address,
        max_restarts=max_restarts,
    )
    try:
        channel = grpc.aio.insecure_channel(trainer.address)
        stub = Stub(channel)
        create = pb.CreateTrainingJobRequest(spec=grpo_spec(inputs, vowels, steps, save_every=2))
        name = (await stub.CreateTrainingJob(create)).name
        folder = job_folder(tmp_path / "trainer" / "jobs", ("dev", name.removeprefix("jobs/")))
        worker = await paused_after(folder, "checkpoint", 2)
        # 2, unless the worker got a whole save interval further in the poll it was let go:
        # the step of its last complete checkpoint, what the trainer restarts from
        saved = saved_step(folder)
        worker.send_signal(signal.SIGKILL)
        job = await wait_for(stub, name, timeout=300)
        events = await watch(stub, name)
        await channel.close()
    finally:
        trainer.stop()
    changes = [e.state_change for e in events if e.HasField("state_change")]
    if max_restarts == 0:
        assert job.state == pb.TrainingJob.STATE_FAILED
        assert "killed" in job.error.message and "SIGKILL" in job.error.message
        return
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error.message
    assert [c.state for c in changes] == [
        pb.TrainingJob.STATE_PENDING,
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_PENDING,
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_SUCCEEDED,
    ]
    assert changes[2].message == (
        f"the worker was killed by SIGKILL; restarting it from step {saved} (restart 1 of 2)"
    )
    assert by_step(events) == list(range(1, steps + 1))
    assert any(m.startswith(f"resumed at step {saved} from ") for m in messages(events))
