"""Hyperparameters: frozen dataclasses whose defaults are the proto's documented ones.

`convert.py` builds them from the request, passing only the fields that were set; `validate`
checks the whole spec once and raises one InvalidArgument listing every bad field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument
from services.rollout.domain import SamplingSpec
from services.trainer.domain import Method

LR_SCHEDULERS = ("linear", "cosine", "constant")
DPO_LOSSES = ("sigmoid", "hinge", "ipo")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
PRECISIONS = ("fp32", "bf16", "fp16")
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
REVISION_NAME = re.compile(r"^(models|datasets|evaluators)/([^/]+)/revisions/([^/]+)$")


@dataclass(frozen=True)
class LoraParams:
    """LoRA (Hu et al., 2021). `target_modules` empty means all linear layers."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (ALL_LINEAR,)

    def violations(self, at: str) -> list[FieldViolation]:
        return _checks(
            at,
            (self.r >= 1, "r", "must be >= 1"),
            (self.alpha > 0, "alpha", "must be > 0"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
        )


@dataclass(frozen=True)
class TrainingParams:
    """Shared optimisation settings. learning_rate None means the method's default."""

    learning_rate: float | None = None
    epochs: float = 1.0
    max_steps: int = 0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 500
    log_every: int = 10
    eval_every: int = 0

    def violations(self, at: str) -> list[FieldViolation]:
        lr = self.learning_rate
        return _checks(
            at,
            (
                lr is None or (math.isfinite(lr) and 0 < lr < 1),
                "learning_rate",
                "must be in (0, 1)",
            ),
            (math.isfinite(self.epochs) and self.epochs > 0, "epochs", "must be > 0"),
            (self.max_steps >= 0, "max_steps", "must be >= 0 (0: derived from epochs)"),
            (self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
            (self.max_length >= 8, "max_length", "must be >= 8 tokens"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (
                self.lr_scheduler in LR_SCHEDULERS,
                "lr_scheduler",
                f"must be one of {', '.join(LR_SCHEDULERS)}",
            ),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (self.save_every >= 0, "save_every", "must be >= 0 (0 disables checkpoints)"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
        )


@dataclass(frozen=True)
class SftParams:
    completion_only_loss: bool = True
    packing: bool = False

    def violations(self, at: str) -> list[FieldViolation]:
        return []


@dataclass(frozen=True)
class DpoParams:
    """DPO (Rafailov et al., 2023); label_smoothing is cDPO."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    max_prompt_length: int = 512

    def violations(self, at: str) -> list[FieldViolation]:
        return _checks(
            at,
            (self.beta > 0, "beta", "must be > 0"),
            (self.loss_type in DPO_LOSSES, "loss_type", f"must be one of {', '.join(DPO_LOSSES)}"),
            (0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
            (self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1"),
        )


@dataclass(frozen=True)
class KtoParams:
    """KTO (Ethayarajh et al., 2024)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def violations(self, at: str) -> list[FieldViolation]:
        return _checks(
            at,
            (self.beta > 0, "beta", "must be > 0"),
            (self.desirable_weight > 0, "desirable_weight", "must be > 0"),
            (self.undesirable_weight > 0, "undesirable_weight", "must be > 0"),
        )


@dataclass(frozen=True)
class RewardModelParams:
    """Bradley-Terry reward model; centring from Eisenstein et al., 2023."""

    center_rewards_coefficient: float = 0.0

    def violations(self, at: str) -> list[FieldViolation]:
        ok = self.center_rewards_coefficient >= 0
        return _checks(at, (ok, "center_rewards_coefficient", "must be >= 0"))


# A job cannot know the serving replica's limits; the rollout service checks n and the context.
_NO_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Sampling(SamplingSpec):
    """Rollout sampling, refused at job creation by the rollout service's own rules."""

    def violations(self, at: str) -> list[FieldViolation]:
        return self.problems(_NO_LIMIT, _NO_LIMIT, at)


@dataclass(frozen=True)
class EvaluateParams:
    sampling: Sampling = field(default_factory=Sampling)
    max_samples: int = 0

    def violations(self, at: str) -> list[FieldViolation]:
        own = _checks(at, (self.max_samples >= 0, "max_samples", "must be >= 0 (0: all)"))
        return own + self.sampling.violations(f"{at}.sampling")


@dataclass(frozen=True)
class GrpoParams:
    """GRPO (Shao et al., 2024). `sampling.n` is always num_generations (set by `complete`)."""

    num_generations: int = 8
    sampling: Sampling = field(default_factory=Sampling)
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    scale_rewards: bool = True
    sync_every: int = 1
    loss_type: str = "grpo"

    def violations(self, at: str) -> list[FieldViolation]:
        own = _checks(
            at,
            (
                self.num_generations >= 2,
                "num_generations",
                "must be >= 2 (group advantages compare samples of one prompt)",
            ),
            (math.isfinite(self.beta) and self.beta >= 0, "beta", "must be >= 0 (0: no KL)"),
            (0 < self.epsilon < 1, "epsilon", "must be in (0, 1)"),
            (self.num_iterations >= 1, "num_iterations", "must be >= 1"),
            (self.sync_every >= 1, "sync_every", "must be >= 1"),
            (
                self.loss_type in GRPO_LOSSES,
                "loss_type",
                f"must be one of {', '.join(GRPO_LOSSES)}",
            ),
            (
                self.sampling.temperature > 0,
                "sampling.temperature",
                "must be > 0: greedy samples of one prompt are all the same",
            ),
        )
        sampling = dataclasses.replace(self.sampling, n=max(self.num_generations, 1))
        return own + sampling.violations(f"{at}.sampling")


@dataclass(frozen=True)
class OnlineRlParams:
    """PPO settings are accepted by the contract but not run yet (see README)."""

    def violations(self, at: str) -> list[FieldViolation]:
        return []


MethodParams = (
    SftParams
    | DpoParams
    | KtoParams
    | RewardModelParams
    | EvaluateParams
    | GrpoParams
    | OnlineRlParams
)
# The params class of each method, and its field name in TrainingJobSpec's oneof.
PARAMS_FOR: dict[Method, tuple[str, type]] = {
    Method.SFT: ("sft", SftParams),
    Method.DPO: ("dpo", DpoParams),
    Method.KTO: ("kto", KtoParams),
    Method.REWARD_MODEL: ("reward_model", RewardModelParams),
    Method.GRPO: ("grpo", GrpoParams),
    Method.PPO: ("ppo", OnlineRlParams),
    Method.EVALUATE: ("evaluate", EvaluateParams),
}


@dataclass(frozen=True)
class DevicePlan:
    """device_type: "auto", "cpu" or "cuda"; strategy: "auto", "single", "ddp", "fsdp"."""

    device_type: str = "auto"
    devices_per_node: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = ""  # "" = bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    max_devices: int = 0  # auto plans only: most devices to use (0: all)

    def violations(self, at: str) -> list[FieldViolation]:
        return _checks(
            at,
            (self.devices_per_node >= 1, "devices_per_node", "must be >= 1"),
            (self.num_nodes >= 1, "num_nodes", "must be >= 1"),
            (
                self.precision in ("", *PRECISIONS),
                "precision",
                f"must be one of {', '.join(PRECISIONS)}",
            ),
            (self.max_devices >= 0, "max_devices", "must be >= 0"),
        )


@dataclass(frozen=True)
class JobSpec:
    """A whole training or evaluation spec. lora None means full-weight tuning."""

    method: Method
    base_model: str
    train_dataset: str
    lora: LoraParams | None = field(default_factory=LoraParams)
    eval_dataset: str = ""
    evaluator: str = ""
    output_model: str = ""
    training: TrainingParams = field(default_factory=TrainingParams)
    params: Any = None  # the MethodParams of `method`; None means its defaults
    resources: DevicePlan = field(default_factory=DevicePlan)
    explicit_resources: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> JobSpec:
        method = Method(data["method"])
        params_cls = PARAMS_FOR[method][1]
        params = dict(data.get("params") or {})
        if "sampling" in params:
            params["sampling"] = Sampling(**_tuples(params["sampling"]))
        lora = data.get("lora")
        return JobSpec(
            method=method,
            base_model=data["base_model"],
            train_dataset=data["train_dataset"],
            lora=LoraParams(**_tuples(lora)) if lora is not None else None,
            eval_dataset=data.get("eval_dataset", ""),
            evaluator=data.get("evaluator", ""),
            output_model=data.get("output_model", ""),
            training=TrainingParams(**data["training"]),
            params=params_cls(**params),
            resources=DevicePlan(**data["resources"]),
            explicit_resources=data.get("explicit_resources", False),
        )


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def default_learning_rate(method: Method, lora: bool) -> float:
    """The proto's table: 2e-5 full / 2e-4 LoRA; online RL 1e-6 full / 1e-5 LoRA."""
    if method in (Method.GRPO, Method.PPO):
        return 1e-5 if lora else 1e-6
    return 2e-4 if lora else 2e-5


def default_output_model(base_model: str, method: Method) -> str:
    """models/{base}-{method}, kept inside the registry's id pattern."""
    match = REVISION_NAME.match(base_model)
    base_id = match.group(2) if match else "model"
    suffix = "-" + method.name.lower().replace("_", "-")
    return f"models/{base_id[: 63 - len(suffix)]}{suffix}"


def complete(spec: JobSpec) -> JobSpec:
    """Fill the defaults that depend on other fields (learning rate, params, output model)."""
    training = spec.training
    if training.learning_rate is None:
        lr = default_learning_rate(spec.method, spec.lora is not None)
        training = dataclasses.replace(training, learning_rate=lr)
    params = spec.params if spec.params is not None else PARAMS_FOR[spec.method][1]()
    output = spec.output_model or default_output_model(spec.base_model, spec.method)
    if spec.method is Method.EVALUATE:
        output = ""  # evaluation produces metrics, no model
    if isinstance(params, GrpoParams):  # the group size is the rollout's n
        sampling = dataclasses.replace(params.sampling, n=params.num_generations)
        params = dataclasses.replace(params, sampling=sampling)
    return dataclasses.replace(spec, training=training, params=params, output_model=output)


def validate(spec: JobSpec) -> JobSpec:
    """Check every field once; raise InvalidArgument with a violation per bad field."""
    problems: list[FieldViolation] = []
    problems += _name_violations(spec)
    if spec.lora is not None:
        problems += spec.lora.violations("spec.tuning.lora")
    problems += spec.training.violations("spec.training")
    if spec.method is Method.KTO and spec.training.per_device_batch_size == 1:
        # KTO's KL baseline pairs each prompt with another row's completion in the batch.
        problems.append(
            FieldViolation("spec.training.per_device_batch_size", "must be >= 2 for KTO")
        )
    field_name, params_cls = PARAMS_FOR[spec.method]
    if spec.params is not None and not isinstance(spec.params, params_cls):
        problems.append(
            FieldViolation(
                "spec.method_params", f"must be spec.{field_name} for {spec.method.name}"
            )
        )
    elif spec.params is not None:
        params: Any = spec.params
        problems += params.violations(f"spec.{field_name}")
    at = "spec.resources.explicit" if spec.explicit_resources else "spec.resources.auto"
    problems += spec.resources.violations(at)
    if problems:
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise InvalidArgument(f"invalid training job spec: {summary}", violations=problems)
    return complete(spec)


def _name_violations(spec: JobSpec) -> list[FieldViolation]:
    problems = []
    names = (
        ("spec.base_model", spec.base_model, "models", True),
        ("spec.train_dataset", spec.train_dataset, "datasets", spec.method is not Method.EVALUATE),
        ("spec.eval_dataset", spec.eval_dataset, "datasets", False),
        ("spec.evaluator", spec.evaluator, "evaluators", False),
    )
    for path, value, collection, required in names:
        if not value:
            if required:
                problems.append(FieldViolation(path, "is required"))
            continue
        match = REVISION_NAME.match(value)
        if match is None or match.group(1) != collection:
            want = f"{collection}/{{id}}/revisions/{{revision or alias}}"
            problems.append(FieldViolation(path, f"must look like {want}"))
    if spec.method is Method.EVALUATE and not (spec.train_dataset or spec.eval_dataset):
        problems.append(FieldViolation("spec.eval_dataset", "EVALUATE needs a prompt dataset"))
    if spec.output_model:
        model_id = spec.output_model.removeprefix("models/")
        if not spec.output_model.startswith("models/") or not MODEL_ID.match(model_id):
            problems.append(
                FieldViolation("spec.output_model", "must look like models/{id}, id [a-z0-9._-]")
            )
    return problems


def _checks(at: str, *checks: tuple[bool, str, str]) -> list[FieldViolation]:
    return [FieldViolation(f"{at}.{name}", message) for ok, name, message in checks if not ok]
