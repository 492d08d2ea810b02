"""A job's spec: the hyperparameters (`params.py`) of one method, checked once by `validate`.

`convert.py` builds a JobSpec from the request, passing only the fields that were set;
`validate` raises one InvalidArgument listing every bad field: values out of range, names that
do not look like registry names, and fields the method does not use (nothing is accepted and
ignored: the method table in `methods.py` says what each method reads). `complete` writes out
the defaults that depend on the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument
from services.trainer.domain import Method
from services.trainer.methods import METHODS, MethodDef
from services.trainer.params import (
    ALL_LINEAR,
    DPO_LOSSES,
    GRPO_LOSSES,
    DevicePlan,
    DpoParams,
    EvaluateParams,
    GrpoParams,
    KtoParams,
    LoraParams,
    PpoParams,
    RewardModelParams,
    Sampling,
    SftParams,
    TrainingParams,
)

# The hyperparameter classes moved to params.py; these names stay importable from here.
__all__ = [
    "ALL_LINEAR",
    "DPO_LOSSES",
    "GRPO_LOSSES",
    "DevicePlan",
    "DpoParams",
    "EvaluateParams",
    "GrpoParams",
    "JobSpec",
    "KtoParams",
    "LoraParams",
    "PpoParams",
    "RewardModelParams",
    "Sampling",
    "SftParams",
    "TrainingParams",
    "complete",
    "default_output_model",
    "validate",
]

MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
REVISION_NAME = re.compile(r"^(models|datasets|evaluators)/([^/]+)/revisions/([^/]+)$")


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

    def digest(self) -> str:
        """sha256 of the spec as a canonical JSON: equal specs, equal digests (request ids)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def from_dict(data: dict[str, Any]) -> JobSpec:
        method = Method(data["method"])
        params_cls = METHODS[method].params
        params = dict(data.get("params") or {})
        if "sampling" in params:
            params["sampling"] = Sampling(**_tuples(params["sampling"]))
        if isinstance(params.get("scale_rewards"), bool):  # jobs stored before it was an enum
            params["scale_rewards"] = "group" if params["scale_rewards"] else "none"
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


def default_output_model(base_model: str, method: Method) -> str:
    """models/{base}-{method}, kept inside the registry's id pattern."""
    match = REVISION_NAME.match(base_model)
    base_id = match.group(2) if match else "model"
    suffix = "-" + method.name.lower().replace("_", "-")
    return f"models/{base_id[: 63 - len(suffix)]}{suffix}"


def complete(spec: JobSpec) -> JobSpec:
    """Fill the defaults that depend on the method (learning rate, params, output model)."""
    method = METHODS[spec.method]
    training, lora = spec.training, spec.lora
    if training.learning_rate is None and method.trains:
        lr = method.default_learning_rate(spec.lora is not None)
        training = dataclasses.replace(training, learning_rate=lr)
    if lora is not None and not method.dropout:
        lora = dataclasses.replace(lora, dropout=0.0)
    params = spec.params if spec.params is not None else method.params()
    output = ""  # a method that trains nothing produces metrics, no model
    if method.trains:
        output = spec.output_model or default_output_model(spec.base_model, spec.method)
    if isinstance(params, GrpoParams):  # the group size is the rollout's n
        sampling = dataclasses.replace(params.sampling, n=params.num_generations)
        params = dataclasses.replace(params, sampling=sampling)
    if isinstance(params, PpoParams) and params.critic_learning_rate is None:
        params = dataclasses.replace(params, critic_learning_rate=training.learning_rate)
    return dataclasses.replace(
        spec, training=training, lora=lora, params=params, output_model=output
    )


def validate(spec: JobSpec) -> JobSpec:
    """Check every field once; raise InvalidArgument with a violation per bad field."""
    method = METHODS[spec.method]
    problems: list[FieldViolation] = []
    problems += _name_violations(spec, method)
    if spec.lora is not None:
        problems += spec.lora.violations("spec.tuning.lora")
    problems += spec.training.violations("spec.training")
    least, why = method.min_batch_size
    if spec.training.per_device_batch_size < least:
        problems.append(
            FieldViolation(
                "spec.training.per_device_batch_size",
                f"must be >= {least} for {method.name}: {why}",
            )
        )
    at = "spec.resources.explicit" if spec.explicit_resources else "spec.resources.auto"
    problems += spec.resources.violations(at)
    if spec.params is not None and not isinstance(spec.params, method.params):
        problems.append(
            FieldViolation(
                "spec.method_params", f"must be spec.{method.params_field} for {method.name}"
            )
        )
    else:
        params: Any = spec.params
        problems += params.violations(f"spec.{method.params_field}") if params else []
        problems += unused_violations(spec, method)
    if problems:
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise InvalidArgument(f"invalid training job spec: {summary}", violations=problems)
    return complete(spec)


def unused_violations(spec: JobSpec, method: MethodDef) -> list[FieldViolation]:
    """A violation for each field set away from its default that `method` does not read."""
    conditions = {c.path: c for c in method.conditions}
    problems = []
    for path, value, default in _values(spec):
        if value == default:
            continue
        if path not in method.reads:
            problems.append(
                FieldViolation(f"spec.{path}", f"{method.name} does not use it; leave it unset")
            )
        elif path in conditions and not conditions[path].holds(spec):
            problems.append(FieldViolation(f"spec.{path}", conditions[path].why))
    return problems


def _values(spec: JobSpec) -> Iterator[tuple[str, Any, Any]]:
    """(path, value, default) of every field a spec can set, as in methods.ALL_PATHS."""
    yield "tuning.full", spec.lora is None, False
    if spec.lora is not None:
        yield from _fields("tuning.lora", spec.lora, LoraParams())
    for name in ("train_dataset", "eval_dataset", "evaluator", "output_model"):
        yield name, getattr(spec, name), ""
    yield from _fields("training", spec.training, TrainingParams())
    if spec.params is not None:
        method = METHODS[spec.method]
        yield from _fields(method.params_field, spec.params, method.params())
    yield "resources.explicit", spec.explicit_resources, False
    if spec.explicit_resources:
        plan = dataclasses.replace(spec.resources, max_devices=0)
        yield from _fields("resources.explicit", plan, DevicePlan())
    else:
        yield "resources.auto.max_devices", spec.resources.max_devices, 0


def _fields(prefix: str, value: Any, default: Any) -> Iterator[tuple[str, Any, Any]]:
    for f in dataclasses.fields(value):
        mine, theirs = getattr(value, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(mine):
            yield from _fields(f"{prefix}.{f.name}", mine, theirs)
        else:
            yield f"{prefix}.{f.name}", mine, theirs


def _name_violations(spec: JobSpec, method: MethodDef) -> list[FieldViolation]:
    problems = []
    names = (
        ("spec.base_model", spec.base_model, "models", True),
        ("spec.train_dataset", spec.train_dataset, "datasets", method.trains),
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
    if not method.trains and not (spec.train_dataset or spec.eval_dataset):
        problems.append(
            FieldViolation("spec.eval_dataset", f"{method.name} needs {method.dataset_needs}")
        )
    if spec.output_model:
        model_id = spec.output_model.removeprefix("models/")
        if not spec.output_model.startswith("models/") or not MODEL_ID.match(model_id):
            problems.append(
                FieldViolation("spec.output_model", "must look like models/{id}, id [a-z0-9._-]")
            )
    return problems
