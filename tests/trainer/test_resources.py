"""The memory estimate by method, worked out by hand for one tiny config.

The tiny config: hidden 64, 2 layers, vocab 512; the base has 1000 parameters (a round number,
so the products are easy to check). Activations per token: 34 bytes x hidden x layers at 16
bits (68 at fp32), plus fp32 logits of 4 x vocab bytes.
"""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition
from services.trainer.domain import Method
from services.trainer.resources import ROLLOUT_PROMPT_TOKENS, Devices, estimate
from services.trainer.spec import (
    DevicePlan,
    GrpoParams,
    JobSpec,
    LoraParams,
    Sampling,
    TrainingParams,
    validate,
)

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
CPU = Devices(cuda_count=0, cuda_memory_bytes=0, cpu_memory_bytes=10**12)
GPU = Devices(cuda_count=1, cuda_memory_bytes=10**12, cpu_memory_bytes=10**9)
TRAINING = TrainingParams(per_device_batch_size=2, max_length=10)


def activations(tokens: int, per_layer_bytes: int) -> int:
    return tokens * 64 * 2 * per_layer_bytes + tokens * 512 * 4


def grpo(lora: LoraParams | None = None, beta: float = 0.04) -> JobSpec:
    params = GrpoParams(num_generations=4, beta=beta, sampling=Sampling(max_tokens=16))
    job = JobSpec(
        Method.GRPO, BASE, DATA, lora=lora, evaluator="evaluators/e/revisions/1", params=params
    )
    return validate(job)


def test_grpo_full_counts_fp32_master_weights_and_b_x_g_rollouts() -> None:
    """B = 8 prompts by default, G = 4: 32 sequences of 512 prompt + 16 new tokens."""
    tokens = 8 * 4 * (ROLLOUT_PROMPT_TOKENS + 16)  # 16,896
    e = estimate(grpo(), 1000, TINY, GPU)  # bf16 compute on CUDA
    assert e.plan.precision == "bf16"
    assert e.breakdown == {
        "weights": 4000,  # fp32 master weights, autocast to bf16 (not 2000)
        "gradients": 4000,
        "optimizer": 8000,
        "activations": activations(tokens, 34),
        "reference_model": 2000,  # a frozen copy in the compute precision
    }
    assert e.memory_per_device_bytes == sum(e.breakdown.values())


def test_grpo_lora_has_a_16_bit_base_and_no_reference_copy() -> None:
    # r 4 on q_proj and v_proj: 2 layers x 4 x ((64 + 64) + (64 + 32)) = 1792 parameters.
    e = estimate(grpo(LoraParams(r=4, target_modules=("q_proj", "v_proj"))), 1000, TINY, GPU)
    tokens = 8 * 4 * (ROLLOUT_PROMPT_TOKENS + 16)
    assert e.trainable_parameter_count == 1792
    assert e.breakdown == {
        "weights": 2000,
        "gradients": 1792 * 4,
        "optimizer": 1792 * 8,
        "activations": activations(tokens, 34),
        "reference_model": 0,
    }
    assert any("adapters off" in note for note in e.notes)


def test_grpo_with_beta_0_has_no_reference() -> None:
    e = estimate(grpo(beta=0.0), 1000, TINY, CPU)
    assert e.breakdown["reference_model"] == 0 and "beta 0: no reference policy" in e.notes


@pytest.mark.parametrize(
    ("method", "sequences", "reference"),
    [
        (Method.SFT, 2, 0),
        (Method.DPO, 4, 4000),  # chosen + rejected; TRL's reference at the policy's fp32
        (Method.KTO, 4, 4000),  # each completion and its mismatched KL completion
        (Method.REWARD_MODEL, 4, 0),  # chosen + rejected, no reference
    ],
)
def test_offline_methods_full_on_cpu(method: Method, sequences: int, reference: int) -> None:
    e = estimate(
        validate(JobSpec(method, BASE, DATA, lora=None, training=TRAINING)), 1000, TINY, CPU
    )
    assert e.breakdown == {
        "weights": 4000,
        "gradients": 4000,
        "optimizer": 8000,
        "activations": activations(sequences * 10, 68),  # fp32: twice the 16-bit 34 bytes
        "reference_model": reference,
    }


def test_dpo_on_cuda_keeps_an_fp32_reference_like_trl() -> None:
    e = estimate(validate(JobSpec(Method.DPO, BASE, DATA, lora=None)), 1000, TINY, GPU)
    assert (e.breakdown["weights"], e.breakdown["reference_model"]) == (4000, 4000)


def test_gradient_checkpointing_keeps_layer_inputs_only() -> None:
    plan = DevicePlan(device_type="cpu", gradient_checkpointing=True)
    job = JobSpec(
        Method.SFT, BASE, DATA, training=TRAINING, resources=plan, explicit_resources=True
    )
    e = estimate(validate(job), 1000, TINY, CPU)
    assert e.breakdown["activations"] == activations(2 * 10, 2 * 4)  # one fp32 input per layer


def test_an_explicit_fsdp_plan_on_cpu_is_refused() -> None:  # accelerate shards on GPUs
    job = JobSpec(
        Method.SFT, BASE, DATA, resources=DevicePlan(device_type="cpu", strategy="fsdp"),
        explicit_resources=True,
    )  # fmt: skip
    with pytest.raises(FailedPrecondition) as err:
        estimate(validate(job), 1000, TINY, CPU)
    assert [v.field for v in err.value.violations] == ["spec.resources.explicit.strategy"]
