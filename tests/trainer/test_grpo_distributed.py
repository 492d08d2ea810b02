"""GRPO on a 2-process torchrun group (gloo, CPU) through the real trainer, rollout, reward and
registry services on the tiny model: the actor group of `rl/group.py` against one process.

Same global batch: the group's step is 2 prompts (1 per device x 2 devices), dealt one
micro-batch (1 prompt x G completions) to each rank; the lone process takes the same 2 prompts
as 2 accumulation steps of 1 prompt, so both compute the same micro-batches, with the same
global loss normaliser. Sampling is seeded and both start from the base, so the rollouts
are identical (the test checks the rewards); the runs then differ only by the order of float
sums (rank 1's gradient added by all_reduce rather than by autograd's accumulation): the trained
weights and each step's loss agree within 1e-5. The jobs run one after the other, so that one
does not change how the rollout service batches the other's requests.

A group whose rank 1 is killed (SIGKILL) after a checkpoint restarts from rank 0's resume state
(every rank holds the whole actor: one file restores any number of ranks) and still ends with
the one-process weights.

The same with the plan's strategy FSDP: the actor and its reference sharded (FSDP2) over the 2
ranks, the gradients reduce-scattered (summed) in each backward pass, the published policy
gathered to rank 0; full tuning and LoRA each equal their one-process run within the same 1e-5.
A killed rank restarts the sharded group from its DCP checkpoint (each rank's shards, beside
rank 0's resume state), and a cancel stops both ranks.
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
    assert_sharded_checkpoints,
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
GROUP = 4
FULL = pb.Tuning(full=pb.FullTuning())  # with beta's reference model on every rank
FSDP = pb.Resources(
    explicit=pb.DevicePlan(
        device_type=pb.DEVICE_TYPE_CPU, devices_per_node=2, strategy=pb.PARALLEL_STRATEGY_FSDP
    )
)


def grpo_spec(
    inputs: Inputs,
    evaluator: str,
    per_device: int,
    accumulation: int,
    resources: pb.Resources,
    suffix: str = "",
    tuning: pb.Tuning = FULL,
) -> pb.TrainingJobSpec:
    return online_spec(
        pb.METHOD_GRPO,
        inputs,
        evaluator,
        per_device,
        accumulation,
        resources,
        "grpo-dist",
        suffix,
        tuning,
        grpo=pb.GrpoParams(
            num_generations=GROUP,
            sync_every=1,
            sampling={"max_tokens": 8, "seed": 3, "temperature": 0.7},
        ),
    )


RUNS: dict[str, Run] = {}  # the one-process reference, run once for the module's tests


async def vowels(stack: ServerThread) -> str:
    return await push_vowels(stack, "evaluators/vowels-dist", "grpo-dist-vowels")


async def one_process(
    stack: ServerThread, trainer: Stub, inputs: Inputs, folder: Path, tuning: pb.Tuning = FULL
) -> Run:
    key = "one-lora" if tuning.HasField("lora") else "one"
    if key not in RUNS:
        job_spec = grpo_spec(inputs, await vowels(stack), 1, 2, ONE_CPU, f"-{key}", tuning)
        name = await submit(trainer, job_spec, f"grpo-dist-{key}")
        RUNS[key] = await finished(stack, trainer, name, folder, tuning.HasField("lora"))
        assert RUNS[key].job.device_plan.strategy == pb.PARALLEL_STRATEGY_SINGLE_DEVICE
    return RUNS[key]


def assert_same_training(two: Run, one: Run, same_steps: int = STEPS) -> None:
    """Rewards equal (the same completions), losses and weights within 1e-5."""
    assert [m.step for m in one.metrics] == list(range(1, STEPS + 1))
    for a, b in zip(two.metrics[:same_steps], one.metrics[:same_steps], strict=True):
        assert a.step == b.step
        assert a.values["reward_mean"] == b.values["reward_mean"]
        assert a.values["tokens"] == b.values["tokens"]
        for key in ("loss", "kl", "entropy", "grad_norm", "logprob_mismatch"):
            assert a.values[key] == pytest.approx(b.values[key], abs=1e-5), (a.step, key)
    assert any(m.values["reward_std"] > 0 for m in one.metrics)  # a learning signal existed
    base = load_file(cached_tiny_model("test") / "model.safetensors")
    if "lora_B" in " ".join(one.weights):  # LoRA's B starts at 0
        assert any(v.abs().max() > 0 for k, v in one.weights.items() if "lora_B" in k)
    else:
        assert any(not torch.equal(base[k], one.weights[k]) for k in base)  # it trained
    assert_same_weights(two.weights, one.weights)


async def test_grpo_on_two_processes_equals_one_on_the_same_global_batch(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = grpo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS)
    name = await submit(trainer, job_spec, "grpo-dist-two")
    two = await finished_as_ddp(stack, trainer, name, tmp_path / "two")
    assert_same_training(two, one)


async def test_a_killed_rank_resumes_the_group_from_its_checkpoint_as_one_process_would(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = grpo_spec(inputs, await vowels(stack), 1, 1, TWO_CPUS, "-killed")
    name = await submit(trainer, job_spec, "grpo-dist-killed")
    processes = await at_first_checkpoint(trainer, name)
    two = await finished_after_killing_rank_1(stack, trainer, name, processes, tmp_path / "two")
    # Rank 0 reports each step once; a step redone after the restart is not reported again.
    assert [m.step for m in two.metrics] == list(range(1, STEPS + 1))
    assert_same_training(two, one)


@pytest.mark.parametrize(
    ("resources", "suffix"), [(TWO_CPUS, "ddp"), (FSDP, "fsdp")], ids=["ddp", "fsdp"]
)
async def test_cancel_stops_every_rank_of_a_lora_grpo_group(
    stack: ServerThread, trainer: Stub, inputs: Inputs, resources: pb.Resources, suffix: str
) -> None:
    job_spec = grpo_spec(inputs, await vowels(stack), 1, 1, resources, f"-cancel-{suffix}", LORA)
    job_spec.training.max_steps = 100_000
    name = await submit(trainer, job_spec, f"grpo-dist-cancel-{suffix}")
    await assert_cancel_stops_every_rank(trainer, name)


@pytest.mark.parametrize(
    ("tuning", "suffix"), [(FULL, "full"), (LORA, "lora")], ids=["full", "lora"]
)
async def test_an_fsdp_grpo_group_equals_one_process_on_the_same_global_batch(
    stack: ServerThread,
    trainer: Stub,
    inputs: Inputs,
    tmp_path: Path,
    tuning: pb.Tuning,
    suffix: str,
) -> None:
    lora = tuning.HasField("lora")
    one = await one_process(stack, trainer, inputs, tmp_path / "one", tuning)
    job_spec = grpo_spec(inputs, await vowels(stack), 1, 1, FSDP, f"-fsdp-{suffix}", tuning)
    name = await submit(trainer, job_spec, f"grpo-fsdp-{suffix}")
    two = await finished(stack, trainer, name, tmp_path / "two", lora)
    assert two.job.device_plan.strategy == pb.PARALLEL_STRATEGY_FSDP
    assert two.job.device_plan.devices_per_node == 2
    assert_same_training(two, one)


async def test_a_killed_rank_resumes_an_fsdp_group_from_its_sharded_checkpoint(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = grpo_spec(inputs, await vowels(stack), 1, 1, FSDP, "-fsdp-killed")
    name = await submit(trainer, job_spec, "grpo-fsdp-killed")
    processes = await at_first_checkpoint(trainer, name)  # step 1's resume state and its shards
    assert_sharded_checkpoints(processes, "actor")
    two = await finished_after_killing_rank_1(stack, trainer, name, processes, tmp_path / "two")
    assert [m.step for m in two.metrics] == list(range(1, STEPS + 1))
    assert_same_training(two, one)
