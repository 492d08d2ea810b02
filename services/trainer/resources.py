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
AT = "spec.resources.explicit"
# Runners that run as a torchrun group (one process per device) when the plan has several.
DISTRIBUTED_RUNNERS = frozenset(
    {"services.trainer.trl_methods", "services.trainer.grpo", "services.trainer.ppo"}
)
# Of those, the runners that shard with FSDP2 in a loop of our own (`distributed.shard_model`:
# GRPO's actor group, `rl/group.py`, and PPO's actor and critic, `rl/ppo_learner.py`): on GPUs
# or on CPU (gloo), without CPU offload or gradient checkpointing.
OWN_FSDP_RUNNERS = frozenset({"services.trainer.grpo", "services.trainer.ppo"})
# The online loop's (GRPO, PPO: `rl/actor.py`) forward passes keep their activations: no plan
# of theirs checkpoints, or the memory estimate would count activations the actor holds.
NO_CHECKPOINTING = OWN_FSDP_RUNNERS
# What FSDP shards over the devices (ZeRO-3); activations stay per device.
SHARDED = ("weights", "gradients", "optimizer", "reference_model", "critic")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Devices:
    """What this trainer can run one job on: `nodes` nodes, each with `cuda_count` GPUs (or
    `cpu_count` cores for a CPU job, one process per core)."""

    cuda_count: int
    cuda_memory_bytes: int
    cpu_memory_bytes: int
    nodes: int = 1
    cpu_count: int = 1


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
    return Devices(count, int(cuda_memory), int(pages), cpu_count=os.cpu_count() or 1)


def distributed(method: MethodDef) -> bool:
    """Whether the method's runner runs as a torchrun group: the offline methods, on TRL and
    accelerate, GRPO, whose actor is replicated or sharded over the group (`rl/group.py`), and
    PPO, whose actor and critic are too (`rl/ppo_learner.py`)."""
    return method.runner in DISTRIBUTED_RUNNERS


def device_and_precision(spec: JobSpec, devices: Devices) -> tuple[str, str, list[str]]:
    """The device type and precision; FailedPrecondition naming the field when an explicit
    plan asks for what this trainer lacks."""
    plan, notes = spec.resources, []
    device = plan.device_type
    if device == "auto":
        device = "cuda" if devices.cuda_count else "cpu"
        notes.append("no CUDA device: planning CPU" if device == "cpu" else "planning CUDA")
    if device == "cuda" and not devices.cuda_count:
        raise _plan_error(f"{AT}.device_type", "CUDA was asked for but this trainer has no GPU")
    precision = plan.precision or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and precision != "fp32":
        raise _plan_error(f"{AT}.precision", f"{precision} needs CUDA; CPU trains in fp32")
    return device, precision, notes


def device_count(spec: JobSpec, device: str, devices: Devices) -> tuple[int, int, list[str]]:
    """(num_nodes, devices_per_node): an explicit plan's, checked against what this trainer
    has; an auto plan's from the inventory and max_devices."""
    method, plan = METHODS[spec.method], spec.resources
    per_node_max = devices.cuda_count if device == "cuda" else devices.cpu_count
    unit = "GPUs" if device == "cuda" else "processes (one per core)"
    if spec.explicit_resources:
        if plan.num_nodes > devices.nodes:
            raise _plan_error(
                f"{AT}.num_nodes",
                f"asks for {plan.num_nodes} nodes; this trainer has {devices.nodes}"
                + (
                    " (multi-node jobs run on Kubernetes: TLM_TRAINER_KUBERNETES_JOBS)"
                    if devices.nodes == 1
                    else " (TLM_TRAINER_KUBERNETES_MAX_NODES)"
                ),
            )
        if plan.devices_per_node > per_node_max:
            raise _plan_error(
                f"{AT}.devices_per_node",
                f"asks for {plan.devices_per_node} {unit} per node; "
                f"this trainer has {per_node_max}",
            )
        if plan.num_nodes * plan.devices_per_node > 1 and not distributed(method):
            raise _plan_error(
                f"{AT}.devices_per_node",
                f"{method.name} runs on one device",
            )
        return plan.num_nodes, plan.devices_per_node, []
    if not method.trains or not distributed(method):
        why = "trains nothing here" if not method.trains else "runs on one device for now"
        return 1, 1, [f"{method.name} {why}"] if device == "cuda" and per_node_max > 1 else []
    if device == "cpu":
        return 1, 1, ["CPU: one process (an explicit plan's devices_per_node runs a gloo group)"]
    available = per_node_max * devices.nodes
    wanted = min(available, plan.max_devices or available)
    if wanted <= per_node_max:
        return 1, wanted, [f"using {wanted} of {available} GPUs (max_devices bounds it)"]
    nodes = wanted // per_node_max
    return nodes, per_node_max, [f"using {nodes} nodes x {per_node_max} GPUs"]


def candidates(spec: JobSpec, device: str, count: int) -> list[DevicePlan]:
    """The plans to try in order, the first that fits wins: the least sharding and recompute
    first (ZeRO: replicas, then sharded states; offload last, it is the slowest)."""
    plan = spec.resources
    if spec.explicit_resources and plan.strategy != "auto":
        return [plan]
    gc, offload = plan.gradient_checkpointing, plan.cpu_offload
    if spec.explicit_resources:  # strategy auto, with the user's own switches
        options = [("single", gc, offload)] if count == 1 else [("ddp", gc, False)]
        if count > 1 and device == "cuda":
            options.append(("fsdp", gc, offload))
    elif count == 1:
        options = [("single", False, False), ("single", True, False)]
        if device == "cuda":
            options.append(("fsdp", True, True))
    else:
        options = [("ddp", False, False), ("fsdp", False, False), ("fsdp", True, False)]
        options.append(("fsdp", True, True))
    runner = METHODS[spec.method].runner
    if runner in OWN_FSDP_RUNNERS:
        options = [o for o in options if o[0] != "fsdp" or not (o[1] or o[2])]
    if runner in NO_CHECKPOINTING and not spec.explicit_resources:  # explicit: refused
        options = [o for o in options if not o[1]]
    return [
        replace(plan, strategy=s, gradient_checkpointing=g, cpu_offload=o) for s, g, o in options
    ]


def check_strategy(plan: DevicePlan, method: MethodDef) -> None:
    """An explicit strategy this trainer cannot run, refused naming its field."""
    count = plan.devices_per_node * plan.num_nodes
    if plan.strategy == "single" and count > 1:
        raise _plan_error(f"{AT}.strategy", f"SINGLE_DEVICE runs on one device, not {count}")
    if plan.strategy == "ddp" and count == 1:
        raise _plan_error(f"{AT}.strategy", "DDP needs two or more devices")
    if plan.gradient_checkpointing and method.runner in NO_CHECKPOINTING:
        raise _plan_error(
            f"{AT}.gradient_checkpointing", f"{method.name}'s actor does not checkpoint"
        )
    if plan.strategy == "fsdp" and method.runner in OWN_FSDP_RUNNERS:
        if plan.cpu_offload:
            raise _plan_error(f"{AT}.cpu_offload", f"{method.name}'s FSDP does not offload")
        if count == 1:
            raise _plan_error(f"{AT}.strategy", f"{method.name}'s FSDP needs two or more devices")
        return  # its own FSDP2 loop: GPUs or a CPU (gloo) group
    if plan.strategy == "fsdp" and plan.device_type == "cpu":
        # accelerate (under TRL) shards with FSDP on accelerators only; CPU groups run DDP.
        raise _plan_error(f"{AT}.strategy", "FSDP runs on GPUs; a CPU group trains with DDP")
    if plan.cpu_offload and (plan.strategy != "fsdp" or plan.device_type != "cuda"):
        raise _plan_error(f"{AT}.cpu_offload", "CPU offload is FSDP's, on GPUs")


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


def trainable_count(
    spec: JobSpec, method: MethodDef, parameters: int, config: dict[str, Any]
) -> tuple[int, list[str]]:
    if not method.trains:
        return 0, [f"{method.name} trains nothing; generation runs on the rollout service"]
    if spec.lora is None:
        return parameters, []
    lora = lora_trainable(config, spec.lora.r, spec.lora.target_modules)
    if lora is None:
        return parameters // 200, [
            "LoRA shapes unknown: LoRA parameters guessed as 0.5% of the model"
        ]
    return lora, []


def replica(
    spec: JobSpec, parameters: int, trainable: int, config: dict[str, Any]
) -> tuple[dict[str, int], list[str]]:
    """The memory of one full replica of the job under `spec.resources` (its precision and
    gradient checkpointing), by part, and notes on what was assumed."""
    method, precision, notes = METHODS[spec.method], spec.resources.precision, []
    reference, note = reference_bytes(spec, method, parameters, precision)
    notes += [note] if note and method.trains else []
    breakdown = {
        "weights": parameters * weight_width(spec, method, precision) if method.trains else 0,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
        "activations": 0,
        "reference_model": reference,
    }
    critic, note = critic_bytes(spec, parameters, trainable, config, precision)
    if critic:
        breakdown["critic"] = critic
        notes.append(note)
    if method.trains:
        act = activation_bytes(config, spec, precision)
        if act is None:
            notes.append("config.json unreadable: activations not estimated")
        breakdown["activations"] = act or 0
    return breakdown, notes


def per_device(whole: dict[str, int], plan: DevicePlan, layers: int) -> dict[str, int]:
    """What one device holds: FSDP divides the model states over the devices (ZeRO-3,
    Rajbhandari et al., 2020, section 5.3); with CPU offload they live in host memory and the
    device holds the two layers in flight (one computing, the next prefetched).

    >>> whole = {"weights": 800, "gradients": 800, "optimizer": 1600, "activations": 50}
    >>> per_device(whole, DevicePlan(strategy="fsdp", devices_per_node=8), layers=4)
    {'weights': 100, 'gradients': 100, 'optimizer': 200, 'activations': 50}
    >>> offload = DevicePlan(strategy="fsdp", devices_per_node=8, cpu_offload=True)
    >>> per_device(whole, offload, layers=4)  # 2 of 4 layers' weights, gathered
    {'weights': 400, 'gradients': 0, 'optimizer': 0, 'activations': 50}
    """
    if plan.strategy != "fsdp":
        return dict(whole)
    count = plan.devices_per_node * plan.num_nodes
    if not plan.cpu_offload:
        return {k: -(-v // count) if k in SHARDED else v for k, v in whole.items()}
    out = {k: 0 if k in SHARDED else v for k, v in whole.items()}
    out["weights"] = 2 * whole["weights"] // max(layers, 2)
    return out


def estimate(spec: JobSpec, parameters: int, config: dict[str, Any], devices: Devices) -> Estimate:
    """The plan the job runs with and its memory per device: an explicit plan as given
    (FailedPrecondition naming the field it cannot run), an auto plan the first candidate that
    fits (`candidates`), or the last one, noted as not fitting."""
    method = METHODS[spec.method]
    device, precision, notes = device_and_precision(spec, devices)
    nodes, per_node, more = device_count(spec, device, devices)
    notes += more
    count = nodes * per_node
    base = replace(
        spec.resources,
        device_type=device,
        precision=precision,
        num_nodes=nodes,
        devices_per_node=per_node,
        max_devices=0,
    )
    if not distributed(method) and not spec.explicit_resources:
        base = replace(base, strategy="single")
    spec = replace(spec, resources=base)
    if not parameters:
        notes.append("the base has no parameter_count in the registry: weights not estimated")
    trainable, more = trainable_count(spec, method, parameters, config)
    notes += more
    available = devices.cuda_memory_bytes if device == "cuda" else devices.cpu_memory_bytes // count
    layers = int(config.get("num_hidden_layers") or 1)
    for plan in candidates(spec, device, count):
        if spec.explicit_resources:
            check_strategy(plan, method)
        whole, assumed = replica(replace(spec, resources=plan), parameters, trainable, config)
        breakdown = per_device(whole, plan, layers)
        total = sum(breakdown.values())
        if total <= available:
            break
    fits = total <= available
    notes += [*assumed, why(plan, sum(whole.values()), total, available, whole)]
    if method.batch is Batch.ROLLOUTS:
        notes.append(f"rollout prompts assumed {ROLLOUT_PROMPT_TOKENS} tokens long")
    if not fits:
        notes.append("does not fit: try LoRA, gradient checkpointing or a smaller batch/max_length")
    return Estimate(plan, parameters, trainable, total, breakdown, fits, notes)


def why(plan: DevicePlan, whole: int, total: int, available: int, parts: dict[str, int]) -> str:
    """The plan in a sentence, with the numbers that chose it."""
    count = plan.devices_per_node * plan.num_nodes
    gib = 2**30
    where = "per process" if plan.device_type == "cpu" else "per GPU"
    head = {
        "single": "one device",
        "ddp": f"DDP over {count} devices: a full replica on each",
        "fsdp": f"FSDP over {count} devices: weights, gradients and optimizer state sharded",
    }[plan.strategy]
    extras = [
        "gradient checkpointing" if plan.gradient_checkpointing else "",
        "CPU offload of the sharded state "
        f"({sum(parts.get(k, 0) for k in SHARDED) / count / gib:.1f} GiB of host memory per "
        "device)"
        if plan.cpu_offload
        else "",
    ]
    extra = "".join(f", {e}" for e in extras if e)
    return (
        f"{head}{extra}; a replica needs {whole / gib:.2f} GiB, this plan "
        f"{total / gib:.2f} GiB {where} of {available / gib:.2f} GiB"
    )
