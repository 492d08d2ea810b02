"""PPO on a 2-process torchrun group (gloo, CPU) through the real trainer, rollout, reward and
registry services on the tiny model: replicas of the actor and the critic
(`rl/ppo_learner.py` over `rl/group.py`) against one process.

Same global batch, as GRPO's test (`test_grpo_distributed.py`): the group's step is 2 prompts
(1 per device x 2 devices) of 4 samples, the lone process's the same 2 prompts as 2
accumulation steps; a forward pass holds one prompt's 4 samples either way. One mini-batch of
8 samples per optimizer step (2 epochs), so each of its 2 micro-batches goes to one rank, the
targets' forward passes too. Sampling is seeded and both start from the base (the critic from
the base with a new head, the same seed), so the rollouts are identical (the test checks the
rewards); the runs then differ only by the order of float sums: each step's policy loss,
value loss, KL, entropy, gradient norm, values and returns (the critic's, before the step's
update) and the trained policy agree within 1e-5. (The critic's final weights are not
published; `test_ppo_group.py` compares them, and the next steps' values follow from them.)

A group whose rank 1 is killed after a checkpoint restarts from rank 0's resume state, the
critic restored on every rank, and ends as one process; cancel stops every rank of a LoRA
group.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from tests.trainer.conftest import Inputs, push_vowels, spec, wait_for, watch
from tests.trainer.test_distributed import ONE_CPU, TWO_CPUS, group_processes, rank_of
from tests.trainer.test_grpo import LORA
from tests.trainer.test_grpo_distributed import STEPS, Run, finished, until_event
from tests.waiting import until
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
FULL = pb.Tuning(full=pb.FullTuning())  # with kl_coef's reference model on every rank
COMPARED = (
    "loss",
    "value_loss",
    "kl",
    "entropy",
    "approx_kl",
    "grad_norm",
    "values_mean",
    "returns_mean",
    "logprob_mismatch",
)


def ppo_spec(
    inputs: Inputs,
    evaluator: str,
    per_device: int,
    accumulation: int,
    resources: pb.Resources,
    suffix: str = "",
    tuning: pb.Tuning = FULL,
) -> pb.TrainingJobSpec:
    devices = resources.explicit.devices_per_node or 1
    return spec(
        pb.METHOD_PPO,
        inputs.base,
        inputs.prompts,
        evaluator=evaluator,
        tuning=tuning,
        output_model=f"models/ppo-dist-{devices}{suffix}",
        resources=resources,
        training=pb.TrainingParams(
            max_steps=STEPS,
            per_device_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            log_every=1,
            learning_rate=1e-3,
            save_every=1,  # rank 0's resume state, every step
        ),
        ppo=pb.PpoParams(
            ppo_epochs=2,
            num_mini_batches=1,
            sync_every=1,
            sampling={"n": 4, "max_tokens": 8, "seed": 3, "temperature": 0.7},
        ),
    )


RUNS: dict[str, Run] = {}  # the one-process reference, run once for the module's tests


async def vowels(stack: ServerThread) -> str:
    return await push_vowels(stack, "evaluators/vowels-ppo-dist", "ppo-dist-vowels")


async def one_process(stack: ServerThread, trainer: Stub, inputs: Inputs, folder: Path) -> Run:
    if "one" not in RUNS:
        job_spec = ppo_spec(inputs, await vowels(stack), 1, 2, ONE_CPU)
        request = pb.CreateTrainingJobRequest(spec=job_spec, request_id="ppo-dist-one")
        name = (await trainer.CreateTrainingJob(request)).name
        RUNS["one"] = await finished(stack, trainer, name, folder)
        assert RUNS["one"].job.device_plan.strategy == pb.PARALLEL_STRATEGY_SINGLE_DEVICE
    return RUNS["one"]


def assert_same_training(two: Run, one: Run) -> None:
    """Rewards equal (the same completions); losses, critic values and weights within 1e-5."""
    assert [m.step for m in one.metrics] == list(range(1, STEPS + 1))
    assert [m.step for m in two.metrics] == list(range(1, STEPS + 1))
    for a, b in zip(two.metrics, one.metrics, strict=True):
        assert a.values["reward_mean"] == b.values["reward_mean"]
        for key in COMPARED:
            assert a.values[key] == pytest.approx(b.values[key], abs=1e-5), (a.step, key)
    assert any(m.values["reward_std"] > 0 for m in one.metrics)  # a learning signal existed
    assert one.metrics[-1].values["kl"] != 0 and one.metrics[-1].values["value_loss"] > 0
    start = load_file(cached_tiny_model("test") / "model.safetensors")
    assert any(not torch.equal(start[k], one.weights[k]) for k in start)  # it trained
    assert two.weights.keys() == one.weights.keys()
    for key in two.weights:
        torch.testing.assert_close(two.weights[key], one.weights[key], atol=1e-5, rtol=0)


async def test_ppo_on_two_processes_equals_one_on_the_same_global_batch(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS)
    request = pb.CreateTrainingJobRequest(spec=job_spec, request_id="ppo-dist-two")
    name = (await trainer.CreateTrainingJob(request)).name
    await until_event(trainer, name, "metrics")
    assert {0, 1} <= {rank_of(p) for p in group_processes(name)}  # both ranks are training
    two = await finished(stack, trainer, name, tmp_path / "two")
    assert two.job.device_plan.devices_per_node == 2
    assert two.job.device_plan.strategy == pb.PARALLEL_STRATEGY_DDP
    assert_same_training(two, one)


async def test_a_killed_rank_resumes_actor_and_critic_from_the_checkpoint_as_one_process(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS, "-killed")
    request = pb.CreateTrainingJobRequest(spec=job_spec, request_id="ppo-dist-killed")
    name = (await trainer.CreateTrainingJob(request)).name
    await until_event(trainer, name, "checkpoint")  # step 1's resume state
    (rank1,) = [p for p in group_processes(name) if rank_of(p) == 1]
    rank1.send_signal(signal.SIGKILL)
    two = await finished(stack, trainer, name, tmp_path / "two")
    events = await watch(trainer, name)
    changes = [e.state_change.message for e in events if e.HasField("state_change")]
    assert any("killed by SIGKILL; restarting it from step" in m for m in changes), changes
    # The steps after the restart used every rank's restored critic (values_mean, value_loss).
    assert_same_training(two, one)


async def test_cancel_stops_every_rank_of_a_lora_ppo_group(
    stack: ServerThread, trainer: Stub, inputs: Inputs
) -> None:
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS, "-cancelled", LORA)
    job_spec.training.max_steps = 100_000
    request = pb.CreateTrainingJobRequest(spec=job_spec, request_id="ppo-dist-cancel")
    name = (await trainer.CreateTrainingJob(request)).name
    await until_event(trainer, name, "metrics")
    assert {0, 1} <= {rank_of(p) for p in group_processes(name)}
    await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
    job = await wait_for(trainer, name, timeout=60)
    assert job.state == pb.TrainingJob.STATE_CANCELLED, job.error
    await until(lambda: not group_processes(name), timeout=10, what="every rank exits")
