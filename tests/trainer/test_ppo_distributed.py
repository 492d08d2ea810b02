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

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from tests.trainer.conftest import Inputs, push_vowels
from tests.trainer.distributed_jobs import (
    STEPS,
    Run,
    Stub,
    assert_cancel_stops_every_rank,
    assert_same_weights,
    at_first_checkpoint,
    finished,
    finished_after_killing_rank_1,
    finished_as_ddp,
    online_spec,
    submit,
)
from tests.trainer.test_distributed import ONE_CPU, TWO_CPUS
from tests.trainer.test_grpo import LORA
from tlm.trainer.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.slow
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
    return online_spec(
        pb.METHOD_PPO,
        inputs,
        evaluator,
        per_device,
        accumulation,
        resources,
        "ppo-dist",
        suffix,
        tuning,
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
        name = await submit(trainer, job_spec, "ppo-dist-one")
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
    assert_same_weights(two.weights, one.weights)


async def test_ppo_on_two_processes_equals_one_on_the_same_global_batch(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS)
    name = await submit(trainer, job_spec, "ppo-dist-two")
    two = await finished_as_ddp(stack, trainer, name, tmp_path / "two")
    assert_same_training(two, one)


async def test_a_killed_rank_resumes_actor_and_critic_from_the_checkpoint_as_one_process(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS, "-killed")
    name = await submit(trainer, job_spec, "ppo-dist-killed")
    processes = await at_first_checkpoint(trainer, name)
    two = await finished_after_killing_rank_1(stack, trainer, name, processes, tmp_path / "two")
    # The steps after the restart used every rank's restored critic (values_mean, value_loss).
    assert_same_training(two, one)


async def test_cancel_stops_every_rank_of_a_lora_ppo_group(
    stack: ServerThread, trainer: Stub, inputs: Inputs
) -> None:
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS, "-cancelled", LORA)
    job_spec.training.max_steps = 100_000
    name = await submit(trainer, job_spec, "ppo-dist-cancel")
    await assert_cancel_stops_every_rank(trainer, name)
