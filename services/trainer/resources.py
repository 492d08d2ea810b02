"""EstimateResources: the device plan a job gets and a rough memory budget per device.

The budget follows the usual accounting (Rajbhandari et al., 2020, ZeRO, section 3), with what
each method does read from its entry in the method table (`methods.py`):
- weights: full tuning keeps the method's master precision (fp32: TRL and our online loop
  autocast to 16 bits); LoRA's frozen base is in the compute precision;
- gradients (fp32) and two fp32 AdamW moments for the trainable parameters;
- activations of one forward pass with gradients, per Korthikanti et al., 2022 (about 34 bytes
  per token per hidden unit per layer in 16 bits, fused attention assumed; layer inputs only
  with gradient checkpointing) plus fp32 logits. Rows: per_device_batch_size x
  sequences_per_row (chosen + rejected) x max_length tokens. Rollouts: per_device_batch_size
  prompts x G completions x (prompt + sampling.max_tokens) tokens;
- a frozen reference policy when the method's loss needs one and full weights train (LoRA
  disables its adapters instead): at the trained weights' precision for TRL, which loads it
  like the policy, or the compute precision for the online loop;
- PPO's critic: a value model of the base's size trained like the policy (weights, gradients,
  AdamW moments) and its activations without the vocabulary's logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.errors import FailedPrecondition, FieldViolation
from services.trainer.methods import METHODS, Batch, MethodDef, Reference
from services.trainer.params import ALL_LINEAR, DevicePlan
from services.trainer.spec import JobSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Prompt tokens assumed for rollouts: the dataset's prompts are not read before the job runs
# (TRL's GRPOConfig bounded prompts at 512 tokens by default).
ROLLOUT_PROMPT_TOKENS = 512
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Devices:
    """What this trainer host has."""

    cuda_count: int
    cuda_memory_bytes: int
    cpu_memory_bytes: int


@dataclass(frozen=True)
class Estimate:
    plan: DevicePlan
    parameter_count: int
    trainable_parameter_count: int
    memory_per_device_bytes: int
    breakdown: dict[str, int]
    fits: bool
    notes: list[str] = field(default_factory=list)


def detect_devices() -> Devices:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_memory = torch.cuda.get_device_properties(0).total_memory if count else 0
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Devices(count, int(cuda_memory), int(pages))


def resolve_plan(spec: JobSpec, devices: Devices) -> tuple[DevicePlan, list[str]]:
    """The plan a job runs with; FailedPrecondition when an explicit plan cannot run here."""
    plan, notes = spec.resources, []
    at = "spec.resources.explicit"
    device = plan.device_type
    if device == "auto":
        device = "cuda" if devices.cuda_count else "cpu"
        notes.append("no CUDA device: planning CPU" if device == "cpu" else "planning CUDA")
    if device == "cuda" and not devices.cuda_count:
        raise _plan_error(f"{at}.device_type", "CUDA was asked for but this trainer has no GPU")
    wanted = plan.devices_per_node * plan.num_nodes if spec.explicit_resources else 1
    if spec.explicit_resources and plan.strategy in ("ddp", "fsdp"):
        raise _plan_error(
            f"{at}.strategy",
            f"{plan.strategy.upper()} (torchrun) is not implemented yet; use SINGLE_DEVICE",
        )
    if wanted > 1:
        raise _plan_error(
            f"{at}.devices_per_node",
            "multi-device training (torchrun DDP/FSDP) is not implemented yet; use one device",
        )
    if not spec.explicit_resources and device == "cuda" and devices.cuda_count > 1:
        notes.append("multi-device training is not implemented yet: using one GPU")
    precision = plan.precision or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and precision != "fp32":
        raise _plan_error(f"{at}.precision", f"{precision} needs CUDA; CPU trains in fp32")
    resolved = replace(
        plan,
        device_type=device,
        devices_per_node=1,
        num_nodes=1,
        strategy="single",
        precision=precision,
    )
    return resolved, notes


def _plan_error(path: str, message: str) -> FailedPrecondition:
    return FailedPrecondition(f"{path}: {message}", violations=[FieldViolation(path, message)])


def lora_trainable(config: dict[str, Any], r: int, targets: tuple[str, ...]) -> int | None:
    """LoRA parameters, r * (in + out) per adapted linear layer (Hu et al., 2021, section 4).

    >>> cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...        "num_key_value_heads": 2, "intermediate_size": 128}
    >>> lora_trainable(cfg, 4, ("q_proj", "v_proj"))  # 2 * 4 * ((64 + 64) + (64 + 32))
    1792
    >>> lora_trainable(cfg, 4, ("qkv_proj",)) is None  # a name we cannot size
    True
    """
    try:
        d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or d // heads)
        ff = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    shapes = {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv_heads * head_dim),
        "v_proj": (d, kv_heads * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }
    names = LINEAR_MODULES if ALL_LINEAR in targets else targets
    if any(n not in shapes for n in names):
        return None
    return layers * r * sum(sum(shapes[n]) for n in names if n in shapes)


def forward_shape(spec: JobSpec, method: MethodDef) -> tuple[int, int]:
    """(sequences, tokens per sequence) of one forward pass with gradients.

    >>> from services.trainer.domain import Method
    >>> from services.trainer.spec import GrpoParams, Sampling, TrainingParams
    >>> training = TrainingParams(per_device_batch_size=2, max_length=100)
    >>> dpo = JobSpec(Method.DPO, "m", "d", training=training)
    >>> forward_shape(dpo, METHODS[Method.DPO])  # chosen + rejected per row
    (4, 100)
    >>> grpo = JobSpec(Method.GRPO, "m", "d", training=training,
    ...                params=GrpoParams(num_generations=4, sampling=Sampling(max_tokens=64)))
    >>> forward_shape(grpo, METHODS[Method.GRPO])  # B x G, prompt + max_tokens
    (8, 576)
    """
    t = spec.training
    if method.batch is Batch.ROWS:
        return t.per_device_batch_size * method.sequences_per_row, t.max_length
    if method.batch is Batch.ROLLOUTS:
        # GRPO's group is num_generations, PPO's sampling.n (its samples per prompt).
        sampling = spec.params.sampling
        group = getattr(spec.params, "num_generations", sampling.n)
        return t.per_device_batch_size * group, ROLLOUT_PROMPT_TOKENS + sampling.max_tokens
    return 0, 0


def activation_bytes(
    config: dict[str, Any], spec: JobSpec, precision: str, logits: bool = True
) -> int | None:
    """Of one forward pass with gradients; `logits` False for a value model (a scalar head)."""
    try:
        d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        vocab = int(config["vocab_size"]) if logits else 0
    except (KeyError, TypeError, ValueError):
        return None
    sequences, length = forward_shape(spec, METHODS[spec.method])
    tokens = sequences * length
    scale = BYTES[precision] / 2  # the 34 bytes are for 16-bit activations
    per_layer = 2 * BYTES[precision] if spec.resources.gradient_checkpointing else 34 * scale
    return int(tokens * d * layers * per_layer + tokens * vocab * 4)


def critic_bytes(
    spec: JobSpec, parameters: int, trainable: int, config: dict[str, Any], precision: str
) -> tuple[int, str]:
    """PPO's value model: a model of the base's size (noted: a critic_model of another size is
    not read here) trained as the policy is (its weights, gradients, AdamW moments) and one
    forward pass with gradients without the vocabulary's logits."""
    method = METHODS[spec.method]
    if not method.critic:
        return 0, ""
    weights = parameters * weight_width(spec, method, precision)
    activations = activation_bytes(config, spec, precision, logits=False) or 0
    note = "the critic is assumed the size of the base"
    return weights + trainable * 12 + activations, note


def weight_width(spec: JobSpec, method: MethodDef, precision: str) -> int:
    """Bytes per weight of the model being trained: the master precision when full weights
    train, the compute precision for LoRA's frozen base."""
    return BYTES[method.master_precision] if spec.lora is None else BYTES[precision]


def reference_bytes(
    spec: JobSpec, method: MethodDef, parameters: int, precision: str
) -> tuple[int, str]:
    """Memory of the frozen reference policy, and a note when there is none though the method
    has one."""
    if method.reference is Reference.NONE:
        return 0, ""
    switch = method.reference_unless_zero
    if switch and not getattr(spec.params, switch):
        return 0, f"{switch} 0: no reference policy"
    if spec.lora is not None:
        return 0, "LoRA: the reference policy is the base with adapters off (no copy)"
    if method.reference is Reference.WEIGHTS:
        return parameters * weight_width(spec, method, precision), ""
    return parameters * BYTES[precision], ""


def estimate(spec: JobSpec, parameters: int, config: dict[str, Any], devices: Devices) -> Estimate:
    plan, notes = resolve_plan(spec, devices)
    method = METHODS[spec.method]
    if not parameters:
        notes.append("the base has no parameter_count in the registry: weights not estimated")
    trainable = parameters
    if spec.lora is not None:
        lora = lora_trainable(config, spec.lora.r, spec.lora.target_modules)
        if lora is None:
            lora = parameters // 200
            notes.append("LoRA shapes unknown: LoRA parameters guessed as 0.5% of the model")
        trainable = lora
    if not method.trains:
        trainable = 0
        notes.append(f"{method.name} trains nothing; generation runs on the rollout service")
    reference, note = reference_bytes(spec, method, parameters, plan.precision)
    notes += [note] if note and method.trains else []
    breakdown = {
        "weights": parameters * weight_width(spec, method, plan.precision) if method.trains else 0,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
        "activations": 0,
        "reference_model": reference,
    }
    critic, note = critic_bytes(spec, parameters, trainable, config, plan.precision)
    if critic:
        breakdown["critic"] = critic
        notes.append(note)
    if method.trains:
        act = activation_bytes(config, spec, plan.precision)
        if act is None:
            notes.append("config.json unreadable: activations not estimated")
        breakdown["activations"] = act or 0
    if method.batch is Batch.ROLLOUTS:
        notes.append(f"rollout prompts assumed {ROLLOUT_PROMPT_TOKENS} tokens long")
    total = sum(breakdown.values())
    available = (
        devices.cuda_memory_bytes if plan.device_type == "cuda" else devices.cpu_memory_bytes
    )
    fits = total <= available
    if not fits:
        notes.append("does not fit: try LoRA, gradient checkpointing or a smaller batch/max_length")
    return Estimate(plan, parameters, trainable, total, breakdown, fits, notes)
