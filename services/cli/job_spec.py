"""The `TrainingJobSpec` that `tlm jobs create` sends: a spec file (proto JSON or YAML), then
the command's flags on top. Pure: no RPCs, so every mapping is tested without a server.

Method settings are set through one table: a flag names a field of the job's method params
(`--beta` is `grpo.beta` for GRPO, `dpo.beta` for DPO), or of their `sampling`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from services.cli.registry_cmds import revision_name
from services.common import proto_json
from tlm.trainer.v1 import trainer_pb2 as pb

# Each method's params message in `TrainingJobSpec.method_params`.
PARAMS_FIELD = {
    pb.METHOD_SFT: "sft",
    pb.METHOD_DPO: "dpo",
    pb.METHOD_KTO: "kto",
    pb.METHOD_REWARD_MODEL: "reward_model",
    pb.METHOD_GRPO: "grpo",
    pb.METHOD_PPO: "ppo",
    pb.METHOD_EVALUATE: "evaluate",
}
# Flag -> field of TrainingParams.
TRAINING_FLAGS = {
    "max_steps": "max_steps",
    "epochs": "epochs",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_batch_size",
    "max_length": "max_length",
    "log_every": "log_every",
}
# Flags that are fields of the method's params (or of their `sampling`), by the same name.
METHOD_FLAGS = (
    "num_generations",
    "beta",
    "epsilon",
    "loss_type",
    "scale_rewards",
    "advantage_estimator",
    "kl_estimator",
    "num_iterations",
    "sync_every",
    "publish_every",
    "max_policy_lag",
    "kl_coef",
    "target_kl",
    "cliprange",
    "cliprange_value",
    "vf_coef",
    "gamma",
    "lam",
    "ppo_epochs",
    "num_mini_batches",
    "entropy_coef",
    "critic_model",
    "critic_learning_rate",
)
SAMPLING_FLAGS = ("temperature", "max_tokens", "samples_per_prompt")
# A flag whose field has another name (PPO's samples per prompt are sampling.n).
FIELD_OF = {"samples_per_prompt": "n"}
# Resource fields where a short `NAME[@REV]` is accepted, and their collection.
NAMES = {
    "base_model": "models",
    "train_dataset": "datasets",
    "eval_dataset": "datasets",
    "evaluator": "evaluators",
}
FLAG_OF = {"train_dataset": "dataset"}  # a field whose flag has another name


class SpecError(Exception):
    """A spec file or a flag that cannot make a spec; the message names the file or flag."""


def read_spec_file(path: Path) -> pb.TrainingJobSpec:
    """A `TrainingJobSpec` in proto JSON (snake_case or camelCase), or YAML (`.yaml`/`.yml`)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SpecError(f"{path}: cannot read it: {reason}") from exc
    data = _load(path, text)
    if not isinstance(data, dict):
        raise SpecError(
            f"{path}: expected an object (a TrainingJobSpec), got {type(data).__name__}"
        )
    spec = pb.TrainingJobSpec()
    try:
        # Enum names as people type them (`grpo`) and as v1.0 wrote them (`GRPO`) load too.
        proto_json.parse_dict(data, spec, any_case=True)
    except json_format.ParseError as exc:
        raise SpecError(f"{path}: {_parse_error(str(exc))}") from exc
    return spec


def _load(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise SpecError(f"{path}: YAML needs the pyyaml package; use JSON") from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from exc


_UNKNOWN = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)" at "([\w.]+)"')


def _parse_error(message: str) -> str:
    """protobuf's parse error, first line; an unknown field gets its path and the known ones.

    >>> _parse_error('Message type "tlm.trainer.v1.KtoParams" has no field named "bta" at '
    ...              '"TrainingJobSpec.kto".\\n Available Fields(except extensions): ...')
    'kto.bta: unknown field; KtoParams has beta, desirable_weight, undesirable_weight'
    """
    match = _UNKNOWN.search(message)
    if match is None:
        return message.splitlines()[0].replace("TrainingJobSpec.", "")
    type_name, field, at = match.groups()
    path = ".".join([*at.split(".")[1:], field])
    fields = pb.DESCRIPTOR.message_types_by_name.get(type_name.rsplit(".", 1)[-1])
    known = ", ".join(f.name for f in fields.fields) if fields else ""
    return f"{path}: unknown field; {type_name.rsplit('.', 1)[-1]} has {known}"


def build_spec(
    base: pb.TrainingJobSpec | None, method: str | None, flags: Mapping[str, Any]
) -> pb.TrainingJobSpec:
    """`base` (from a file, or empty) with `method` and every flag that is not None on top."""
    spec = pb.TrainingJobSpec()
    if base is not None:
        spec.CopyFrom(base)
    if method is not None:
        spec.method = _method(method)
    if spec.method == pb.METHOD_UNSPECIFIED:
        raise SpecError("--method is needed (or `method` in the spec file)")
    _resources(spec, flags)
    _tuning(spec, flags.get("lora"), flags.get("lora_r"))
    for flag, field in TRAINING_FLAGS.items():
        if flags.get(flag) is not None:
            setattr(spec.training, field, flags[flag])
    _method_settings(spec, flags)
    for field in ("base_model", "train_dataset"):
        if not getattr(spec, field) and not (field == "train_dataset" and spec.eval_dataset):
            flag = FLAG_OF.get(field, field).replace("_", "-")
            raise SpecError(f"--{flag} is needed (or `{field}` in the spec file)")
    if spec.method == pb.METHOD_EVALUATE and not spec.eval_dataset:
        # EVALUATE reads eval_dataset; --dataset is the natural flag for it.
        spec.eval_dataset, spec.train_dataset = spec.train_dataset, ""
    return spec


def _method(method: str) -> pb.Method.ValueType:
    try:
        return proto_json.enum_number(pb.Method, method)  # type: ignore[return-value]
    except ValueError as exc:
        known = ", ".join(m.lower() for m in PARAMS_FIELD.values())
        raise SpecError(f"--method: unknown method {method!r}; one of {known}") from exc


def _resources(spec: pb.TrainingJobSpec, flags: Mapping[str, Any]) -> None:
    """Resource flags (`--base-model tiny@r2`) and short names in the file become full names."""
    for field, collection in NAMES.items():
        value = flags.get(FLAG_OF.get(field, field)) or getattr(spec, field)
        if value:
            setattr(spec, field, revision_name(collection, value))
    if flags.get("output_model"):
        spec.output_model = flags["output_model"]


def _tuning(spec: pb.TrainingJobSpec, lora: bool | None, lora_r: int | None) -> None:
    """--full, --lora and --lora-r; neither keeps the file's tuning (or the default, LoRA)."""
    if lora is False:
        if lora_r is not None:
            raise SpecError("--lora-r needs LoRA; it was given with --full")
        spec.tuning.full.SetInParent()
    elif lora or lora_r is not None:
        spec.tuning.lora.SetInParent()
        if lora_r is not None:
            spec.tuning.lora.r = lora_r


def _method_settings(spec: pb.TrainingJobSpec, flags: Mapping[str, Any]) -> None:
    """Each method flag on the method's params message; a flag it has no field for is refused."""
    field = PARAMS_FIELD.get(spec.method)
    given = [f for f in (*METHOD_FLAGS, *SAMPLING_FLAGS) if flags.get(f) is not None]
    if field is None or (not given and field != "grpo"):
        return
    params: Message = getattr(spec, field)
    params.SetInParent()
    for flag in given:
        target = params
        if flag in SAMPLING_FLAGS and "sampling" in params.DESCRIPTOR.fields_by_name:
            target = getattr(params, "sampling")  # noqa: B009 (a field named by the table)
        name = FIELD_OF.get(flag, flag)
        if name not in target.DESCRIPTOR.fields_by_name:
            method = proto_json.short_name(pb.Method, spec.method).lower()
            raise SpecError(f"--{flag.replace('_', '-')}: {method} jobs have no such setting")
        value = flags[flag]
        if flag == "critic_model":  # NAME[@REV], as --base-model
            value = revision_name("models", value)
        setattr(target, name, value)
