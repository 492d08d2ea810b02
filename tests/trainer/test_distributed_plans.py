"""Device plans on made-up inventories, worked out by hand.

The 7B-like config is Llama-2-7B's shape with a round 7e9 parameters: hidden 4096, 32 layers,
vocab 32000, one row of 1024 tokens per device. Per device, in bytes:
- full SFT: fp32 master weights 28e9, gradients 28e9, AdamW moments 56e9 (112e9 of model
  state); activations 1024 x 4096 x 32 x 34 (bf16) = 4_563_402_752 plus fp32 logits
  1024 x 32000 x 4 = 131_072_000, so 4_694_474_752. A replica: 116_694_474_752, more than an
  80 GiB GPU (85_899_345_920): DDP cannot run, FSDP over 8 holds 112e9 / 8 + activations.
- LoRA r=16 on every linear layer: 16 x ((4 x 8192) + 3 x (4096 + 11008)) = 1_249_280 per
  layer, 39_976_960 in all; the frozen base in bf16 is 14e9.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from services.common.errors import FailedPrecondition
from services.trainer.domain import Method
from services.trainer.resources import Devices, estimate
from services.trainer.spec import (
    DevicePlan,
    GrpoParams,
    JobSpec,
    LoraParams,
    PpoParams,
    Sampling,
    TrainingParams,
    validate,
)

BASE = "models/m/revisions/r1"
DATA = "datasets/d/revisions/r1"
LLAMA7 = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
P7B = 7_000_000_000
GIB80 = 80 * 2**30
ACTIVATIONS = 1024 * 4096 * 32 * 34 + 1024 * 32000 * 4
ONE_CPU = Devices(cuda_count=0, cuda_memory_bytes=0, cpu_memory_bytes=10**12, cpu_count=1)
TWO_CORES = Devices(cuda_count=0, cuda_memory_bytes=0, cpu_memory_bytes=10**12, cpu_count=2)
EIGHT_GPUS = Devices(cuda_count=8, cuda_memory_bytes=GIB80, cpu_memory_bytes=2**40)
ONE_GPU = Devices(cuda_count=1, cuda_memory_bytes=GIB80, cpu_memory_bytes=2**40)
TWO_NODES = Devices(cuda_count=8, cuda_memory_bytes=GIB80, cpu_memory_bytes=2**40, nodes=2)
ROW = TrainingParams(per_device_batch_size=1, max_length=1024)


def sft(lora: LoraParams | None = None, plan: DevicePlan | None = None) -> JobSpec:
    job = JobSpec(
        Method.SFT,
        BASE,
        DATA,
        lora=lora,
        training=ROW,
        resources=plan or DevicePlan(),
        explicit_resources=plan is not None,
    )
    return validate(job)


def shape(plan: DevicePlan) -> tuple[str, int, int, bool, bool]:
    return (
        plan.strategy,
        plan.num_nodes,
        plan.devices_per_node,
        plan.gradient_checkpointing,
        plan.cpu_offload,
    )


def test_a_tiny_model_on_one_cpu_is_one_fp32_process() -> None:
    e = estimate(sft(), 1000, TINY, ONE_CPU)
    assert shape(e.plan) == ("single", 1, 1, False, False)
    assert (e.plan.device_type, e.plan.precision, e.fits) == ("cpu", "fp32", True)


def test_a_cpu_trainer_with_two_cores_still_plans_one_process_unless_asked() -> None:
    assert estimate(sft(), 1000, TINY, TWO_CORES).plan.devices_per_node == 1
    asked = sft(plan=DevicePlan(device_type="cpu", devices_per_node=2))
    e = estimate(asked, 1000, TINY, TWO_CORES)
    assert shape(e.plan) == ("ddp", 1, 2, False, False)  # a gloo group of 2 processes


def test_full_7b_on_8_gpus_shards_with_fsdp_because_a_replica_does_not_fit() -> None:
    e = estimate(sft(), P7B, LLAMA7, EIGHT_GPUS)
    assert shape(e.plan) == ("fsdp", 1, 8, False, False)
    assert e.plan.precision == "bf16"
    assert e.breakdown == {
        "weights": 3_500_000_000,
        "gradients": 3_500_000_000,
        "optimizer": 7_000_000_000,
        "activations": ACTIVATIONS,
        "reference_model": 0,
    }
    assert e.memory_per_device_bytes == 14_000_000_000 + 4_694_474_752
    assert e.fits
    assert any("FSDP over 8 devices" in n and "108.68 GiB" in n for n in e.notes)


def test_lora_7b_on_8_gpus_replicates_with_ddp() -> None:
    e = estimate(sft(lora=LoraParams(r=16)), P7B, LLAMA7, EIGHT_GPUS)
    assert shape(e.plan) == ("ddp", 1, 8, False, False)
    assert e.trainable_parameter_count == 39_976_960
    assert e.memory_per_device_bytes == 14_000_000_000 + 39_976_960 * 12 + ACTIVATIONS


def test_two_nodes_of_8_shard_over_16_and_max_devices_bounds_them() -> None:
    e = estimate(sft(), P7B, LLAMA7, TWO_NODES)
    assert shape(e.plan) == ("fsdp", 2, 8, False, False)
    assert e.memory_per_device_bytes == 7_000_000_000 + ACTIVATIONS  # 112e9 / 16
    bounded = validate(
        JobSpec(Method.SFT, BASE, DATA, None, training=ROW, resources=DevicePlan(max_devices=4))
    )
    e = estimate(bounded, P7B, LLAMA7, TWO_NODES)
    assert shape(e.plan) == ("fsdp", 1, 4, False, False)
    assert e.memory_per_device_bytes == 28_000_000_000 + ACTIVATIONS


def test_full_7b_on_one_gpu_needs_checkpointing_and_cpu_offload() -> None:
    # Checkpointing keeps 2 x 2 bytes (bf16) per hidden unit per layer, plus the logits; the
    # device keeps 2 of the 32 layers' fp32 weights gathered: 2 x 28e9 / 32 = 1.75e9.
    e = estimate(sft(), P7B, LLAMA7, ONE_GPU)
    assert shape(e.plan) == ("fsdp", 1, 1, True, True)
    assert e.breakdown["weights"] == 1_750_000_000
    assert e.breakdown["activations"] == 1024 * 4096 * 32 * 4 + 1024 * 32000 * 4
    assert e.breakdown["optimizer"] == 0
    assert any("host memory" in n for n in e.notes)


def grpo(plan: DevicePlan | None = None) -> JobSpec:
    params = GrpoParams(num_generations=4, sampling=Sampling(max_tokens=16))
    job = JobSpec(
        Method.GRPO,
        BASE,
        DATA,
        evaluator="evaluators/e/revisions/1",
        params=params,
        resources=plan or DevicePlan(),
        explicit_resources=plan is not None,
    )
    return validate(job)


def test_grpo_replicates_its_actor_over_the_eight_gpus() -> None:
    # GRPO's actor group is DDP (rl/group.py): no FSDP candidate, a full replica per GPU.
    e = estimate(grpo(), 1000, TINY, EIGHT_GPUS)
    assert shape(e.plan) == ("ddp", 1, 8, False, False)
    assert any("DDP over 8 devices" in n for n in e.notes)


def ppo(plan: DevicePlan | None = None) -> JobSpec:
    return validate(
        JobSpec(
            Method.PPO,
            BASE,
            DATA,
            evaluator="evaluators/e/revisions/1",
            params=PpoParams(),
            resources=plan or DevicePlan(),
            explicit_resources=plan is not None,
        )
    )


def test_ppo_replicates_its_actor_and_critic_over_the_eight_gpus() -> None:
    # A replica of the tiny actor and critic fits: DDP before FSDP (rl/ppo_learner.py).
    e = estimate(ppo(), 1000, TINY, EIGHT_GPUS)
    assert shape(e.plan) == ("ddp", 1, 8, False, False)
    assert any("DDP over 8 devices" in n for n in e.notes)


def test_full_7b_ppo_on_8_gpus_shards_actor_reference_and_critic_with_fsdp() -> None:
    # A replica holds the actor's 112e9 bytes of model state, the bf16 reference (14e9) and a
    # critic of the base's size (112e9 more): FSDP2 over 8 (rl/ppo_learner.py) divides all
    # three by 8: 3.5e9 + 3.5e9 + 7e9 for the actor, 1.75e9 for the reference, 14e9 (plus its
    # activations) for the critic.
    job = JobSpec(
        Method.PPO,
        BASE,
        DATA,
        lora=None,
        evaluator="evaluators/e/revisions/1",
        params=PpoParams(sampling=Sampling(n=1, max_tokens=16)),
        training=TrainingParams(per_device_batch_size=1),
    )
    e = estimate(validate(job), P7B, LLAMA7, EIGHT_GPUS)
    assert shape(e.plan) == ("fsdp", 1, 8, False, False)
    assert e.breakdown["weights"] == 3_500_000_000 and e.breakdown["gradients"] == 3_500_000_000
    assert e.breakdown["optimizer"] == 7_000_000_000
    assert e.breakdown["reference_model"] == 1_750_000_000
    assert 14_000_000_000 < e.breakdown["critic"] < 14_000_000_000 + 2**30
    assert e.fits and any("FSDP over 8 devices" in n for n in e.notes)


def test_an_explicit_multi_device_ppo_plan_runs_ddp() -> None:
    two = DevicePlan(device_type="cpu", devices_per_node=2)
    assert shape(estimate(ppo(two), 1000, TINY, TWO_CORES).plan) == ("ddp", 1, 2, False, False)


@pytest.mark.parametrize(
    ("plan", "devices", "field"),
    [
        (DevicePlan(device_type="cuda"), ONE_CPU, "device_type"),
        (DevicePlan(device_type="cuda", devices_per_node=16), EIGHT_GPUS, "devices_per_node"),
        (DevicePlan(device_type="cpu", devices_per_node=3), TWO_CORES, "devices_per_node"),
        (DevicePlan(device_type="cuda", num_nodes=2), EIGHT_GPUS, "num_nodes"),
        (
            DevicePlan(device_type="cuda", devices_per_node=2, strategy="single"),
            EIGHT_GPUS,
            "strategy",
        ),
        (DevicePlan(device_type="cuda", strategy="ddp"), EIGHT_GPUS, "strategy"),
        (DevicePlan(device_type="cpu", devices_per_node=2, strategy="fsdp"), TWO_CORES, "strategy"),
        (
            DevicePlan(device_type="cuda", devices_per_node=2, strategy="ddp", cpu_offload=True),
            EIGHT_GPUS,
            "cpu_offload",
        ),
        (DevicePlan(device_type="cpu", precision="bf16"), ONE_CPU, "precision"),
    ],
)
def test_an_explicit_plan_that_cannot_run_is_refused_naming_its_field(
    plan: DevicePlan, devices: Devices, field: str
) -> None:
    with pytest.raises(FailedPrecondition) as err:
        estimate(sft(plan=plan), 1000, TINY, devices)
    assert [v.field for v in err.value.violations] == [f"spec.resources.explicit.{field}"]


def test_an_explicit_multi_device_grpo_plan_runs_ddp() -> None:
    e = estimate(grpo(DevicePlan(device_type="cpu", devices_per_node=2)), 1000, TINY, TWO_CORES)
    assert shape(e.plan) == ("ddp", 1, 2, False, False)


@pytest.mark.parametrize("job", [grpo, ppo], ids=["grpo", "ppo"])
def test_an_explicit_fsdp_online_plan_shards_its_models_on_gpus_or_a_cpu_group(job: Any) -> None:
    # GRPO's actor group, and PPO's actor and critic, shard with FSDP2 in their own loop
    # (rl/group.py, rl/ppo_learner.py), gloo on CPU too.
    for plan, devices in (
        (DevicePlan(device_type="cuda", devices_per_node=2, strategy="fsdp"), EIGHT_GPUS),
        (DevicePlan(device_type="cpu", devices_per_node=2, strategy="fsdp"), TWO_CORES),
    ):
        assert shape(estimate(job(plan), 1000, TINY, devices).plan)[:3] == ("fsdp", 1, 2)


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        (
            DevicePlan(device_type="cuda", devices_per_node=2, strategy="fsdp", cpu_offload=True),
            "cpu_offload",
        ),
        (DevicePlan(device_type="cuda", devices_per_node=1, strategy="fsdp"), "strategy"),
    ],
)
@pytest.mark.parametrize("job", [grpo, ppo], ids=["grpo", "ppo"])
def test_an_fsdp_online_plan_it_cannot_run_is_refused_naming_the_field(
    job: Any, plan: DevicePlan, field: str
) -> None:
    with pytest.raises(FailedPrecondition) as err:
        estimate(job(plan), 1000, TINY, EIGHT_GPUS)
    assert [v.field for v in err.value.violations] == [f"spec.resources.explicit.{field}"]


@pytest.mark.parametrize("job", [grpo, ppo], ids=["grpo", "ppo"])
@pytest.mark.parametrize(
    ("plan", "devices"),
    [
        (DevicePlan(device_type="cuda", devices_per_node=2, strategy="fsdp"), EIGHT_GPUS),
        (DevicePlan(device_type="cpu", devices_per_node=2, strategy="ddp"), TWO_CORES),
        (DevicePlan(device_type="cpu", devices_per_node=2), TWO_CORES),  # strategy auto
        (DevicePlan(device_type="cpu"), ONE_CPU),
    ],
)
def test_an_online_plan_with_gradient_checkpointing_is_refused_naming_it(
    job: Any, plan: DevicePlan, devices: Devices
) -> None:
    # The online actor keeps its activations (rl/actor.py). The spec's check refuses the field
    # first (GRPO and PPO do not read it); the plan's own check refuses it too.
    spec = dataclasses.replace(
        job(), resources=dataclasses.replace(plan, gradient_checkpointing=True)
    )
    spec = dataclasses.replace(spec, explicit_resources=True)
    with pytest.raises(FailedPrecondition) as err:
        estimate(spec, 1000, TINY, devices)
    field = "spec.resources.explicit.gradient_checkpointing"
    assert [v.field for v in err.value.violations] == [field]
    assert "does not checkpoint" in err.value.message


@pytest.mark.parametrize("job", [grpo, ppo], ids=["grpo", "ppo"])
def test_an_online_auto_plan_never_counts_on_gradient_checkpointing(job: Any) -> None:
    # Full 7B on one GPU fits no plan; the last tried keeps its activations, as the actor does.
    e = estimate(dataclasses.replace(job(), lora=None), P7B, LLAMA7, ONE_GPU)
    assert shape(e.plan) == ("single", 1, 1, False, False)
    assert not e.fits
    assert e.breakdown["activations"] > 1024 * 4096 * 32 * 4  # not checkpointing's layer inputs


def test_an_explicit_fsdp_plan_on_gpus_is_kept_as_given() -> None:
    plan = DevicePlan(device_type="cuda", devices_per_node=4, strategy="fsdp")
    e = estimate(sft(lora=LoraParams(r=16), plan=plan), P7B, LLAMA7, EIGHT_GPUS)
    assert shape(e.plan) == ("fsdp", 1, 4, False, False)
    assert e.breakdown["weights"] == 3_500_000_000  # 14e9 bf16 base / 4
