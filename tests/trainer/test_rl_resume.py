"""Online RL survives a trainer crash, end to end through the services: a PPO job (critic, its
optimizer, the adaptive KL controller) and an RLOO job (GRPO's loop, LoRA) run on a trainer
process that is SIGKILLed (its worker with it) after the checkpoint at step 2; a new trainer on
the same data directory puts the job back to PENDING, resumes it from step 2 and finishes it.

Everything is seeded (prompt order, sampling seed + step, the learner's shuffles), so the
resumed steps must equal an uninterrupted run of the same spec: that holds only when the
policy, its optimizer and schedule, the served policy, and for PPO the critic with its
optimizer and schedule, kl_coef and the batch count all come back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.trainer.supervisor import job_folder
from tests.trainer.conftest import (
    Inputs,
    paused_when,
    push_vowels,
    reported,
    start_trainer,
    wait_for,
    watch,
)
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
STEPS, SAVE_EVERY, GROUP, KL_COEF = 5, 2, 4, 0.05
# What each method's resumed steps must repeat of the uninterrupted run.
COMPARED = {
    "ppo": ["loss", "value_loss", "kl", "kl_coef", "values_mean", "learning_rate",
            "critic_learning_rate", "reward_mean"],
    "rloo": ["loss", "kl", "entropy", "learning_rate", "reward_mean", "grad_norm"],
}  # fmt: skip


def resume_spec(method: str, inputs: Inputs, evaluator: str, output: str) -> pb.TrainingJobSpec:
    training = pb.TrainingParams(
        max_steps=STEPS,
        per_device_batch_size=2,  # 2 prompts x 4 samples a step
        learning_rate=0.01,
        seed=1,
        log_every=1,
        save_every=SAVE_EVERY,
    )
    sampling = {"n": GROUP, "max_tokens": 5, "seed": 1}
    common = {
        "base_model": inputs.base,
        "train_dataset": inputs.prompts,
        "evaluator": evaluator,
        "output_model": output,
        "training": training,
    }
    if method == "ppo":
        # kl_coef moves every step (a horizon of 8 samples): a fresh controller would not have it.
        ppo = pb.PpoParams(sampling=sampling, kl_coef=KL_COEF, target_kl=0.01, kl_horizon=8)
        return pb.TrainingJobSpec(
            method=pb.METHOD_PPO, tuning=pb.Tuning(full=pb.FullTuning()), ppo=ppo, **common
        )
    sampling.pop("n")
    grpo = pb.GrpoParams(
        num_generations=GROUP, beta=0.04, advantage_estimator="rloo", sampling=sampling
    )
    lora = pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return pb.TrainingJobSpec(
        method=pb.METHOD_GRPO, tuning=pb.Tuning(lora=lora), grpo=grpo, **common
    )


@pytest.fixture(scope="module")
async def vowels(stack: ServerThread) -> str:
    """The random tiny model's completions hold different numbers of vowels: rewards vary
    within a group, so the advantages are not all zero."""
    return await push_vowels(stack, "evaluators/vowels-resume")


def trainer_process(data_dir: Path, address: str) -> tuple[subprocess.Popen[bytes], str]:
    """`tlm serve trainer` in its own process (a real crash can kill it), against the stack's
    registry, rollout and reward; returns the process and its address."""
    ready = data_dir / "trainer-address"
    env = {
        **os.environ,
        "TLM_TRAINER_DATA_DIR": str(data_dir),
        "TLM_TRAINER_REGISTRY_ADDRESS": address,
        "TLM_TRAINER_ROLLOUT_ADDRESS": address,
        "TLM_TRAINER_REWARD_ADDRESS": address,
    }
    command = [sys.executable, "-m", "services.cli.main", "serve", "trainer"]
    with (data_dir / "first-trainer.log").open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", "0", "--insecure-dev", "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (data_dir / "first-trainer.log").read_text()
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.1)
    return proc, ready.read_text()


async def pause_at_first_checkpoint(
    trainer: subprocess.Popen[bytes], folder: Path
) -> psutil.Process:
    """The job's worker, stopped (SIGSTOP) as soon as it writes its first checkpoint event."""

    def find() -> list[psutil.Process]:
        assert trainer.poll() is None, "the trainer exited"
        return [p for p in psutil.Process(trainer.pid).children() if of(p, folder)]

    (worker,) = await paused_when(
        find, lambda _: reported(folder, "checkpoint"), "a checkpoint", timeout=120
    )
    return worker


def of(process: psutil.Process, folder: Path) -> bool:
    with contextlib.suppress(psutil.Error):
        return str(folder) in process.cmdline()
    return False


async def recorded_checkpoint(stub: Stub, name: str) -> pb.JobEvent:
    """The job's first checkpoint event, once the trainer has recorded it."""
    call = stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=name), timeout=120)
    try:
        async for event in call:
            if event.HasField("checkpoint"):
                return event
    finally:
        call.cancel()
    raise AssertionError(f"{name} ended without a checkpoint")


def crash(trainer: subprocess.Popen[bytes], worker: psutil.Process) -> None:
    """The host loses the trainer and its worker at once: SIGKILL to both, no shutdown code."""
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=30)
    with contextlib.suppress(psutil.NoSuchProcess):
        worker.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs([worker], timeout=30)
    assert not alive


def by_step(events: list[pb.JobEvent]) -> dict[int, dict[str, float]]:
    return {e.metrics.step: dict(e.metrics.values) for e in events if e.HasField("metrics")}


@pytest.mark.parametrize("method", ["ppo", "rloo"])
async def test_online_rl_resumes_after_a_trainer_crash(
    stack: ServerThread, inputs: Inputs, vowels: str, tmp_path: Path, method: str
) -> None:
    output = f"models/tiny-resume-{method}"
    job_spec = resume_spec(method, inputs, vowels, output)
    first, address = trainer_process(tmp_path, stack.address)
    worker: psutil.Process | None = None
    try:
        channel = grpc.aio.insecure_channel(address)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        job = await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=job_spec))
        job_id = job.name.removeprefix("jobs/")
        worker = await pause_at_first_checkpoint(
            first, job_folder(tmp_path / "trainer" / "jobs", ("dev", job_id))
        )
        saved = (await recorded_checkpoint(stub, job.name)).checkpoint
        assert saved.step == SAVE_EVERY and saved.policy_revision
        await channel.close()
        crash(first, worker)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if worker is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()

    second = start_trainer(
        tmp_path,
        stack.address,
        "services.trainer.worker",
        rollout_address=stack.address,
        reward_address=stack.address,
    )
    try:
        channel = grpc.aio.insecure_channel(second.address)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        done = await wait_for(stub, job.name, timeout=180)
        assert done.state == pb.TrainingJob.STATE_SUCCEEDED, done.error.message
        events = await watch(stub, job.name)
        # The uninterrupted run of the same spec, on the same trainer settings.
        reference_spec = resume_spec(method, inputs, vowels, f"{output}-reference")
        reference = await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=reference_spec))
        reference_done = await wait_for(stub, reference.name, timeout=180)
        assert reference_done.state == pb.TrainingJob.STATE_SUCCEEDED, reference_done.error.message
        expected = by_step(await watch(stub, reference.name))
        await channel.close()
    finally:
        second.stop()

    changes = [(i, e.state_change) for i, e in enumerate(events) if e.HasField("state_change")]
    assert [c.state for _, c in changes] == [
        pb.TrainingJob.STATE_PENDING,
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_PENDING,  # the crash left it RUNNING with a checkpoint: the restart
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_SUCCEEDED,
    ]
    assert f"resuming from step {SAVE_EVERY}" in changes[2][1].message
    restart = changes[2][0]
    before, after = by_step(events[:restart]), by_step(events[restart:])
    # Every step recorded once: the crashed run's up to the crash (step 3 if it got that far),
    # the resumed run's after the checkpoint, never one of them twice.
    assert set(before) & set(after) == set()
    assert sorted([*before, *after]) == list(range(1, STEPS + 1)), (before.keys(), after.keys())
    assert after and min(after) > SAVE_EVERY and set(before) >= set(range(1, SAVE_EVERY + 1))
    logs = [e.log.message for e in events[restart:] if e.HasField("log")]
    assert f"resumed at step {SAVE_EVERY} from {saved.policy_revision}" in logs
    checkpoints = [e.checkpoint.step for e in events if e.HasField("checkpoint")]
    assert checkpoints[0] == SAVE_EVERY and checkpoints[-1] == 4

    # The restored state is real: the resumed steps are the uninterrupted run's.
    assert sorted(expected) == list(range(1, STEPS + 1))
    for step, values in after.items():
        for key in COMPARED[method]:
            assert values[key] == pytest.approx(expected[step][key], rel=1e-3, abs=1e-6), (
                step,
                key,
            )
    if method == "ppo":
        # Adaptive KL moved kl_coef from its start; a fresh controller would be back at it.
        assert after[min(after)]["kl_coef"] != pytest.approx(KL_COEF, rel=1e-3)

    registry = RegistryClient(stack.address)
    try:
        revision = await registry.get_model_revision(done.output_model_revision)
    finally:
        await registry.close()
    assert done.output_model_revision.startswith(output + "/")
    assert done.output_model_revision != saved.policy_revision  # published after step 5
    assert revision.format == (
        registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
        if method == "ppo"
        else registry_pb2.MODEL_FORMAT_LORA_ADAPTER
    )
