"""The create-job form, both ways: which fields a method's form shows (the paths the trainer's
method table says the method reads, typed by the proto, with the params dataclasses' defaults),
and the `TrainingJobSpec` a submitted form makes. Pure: no RPCs.

Inputs are named by their spec path (`training.learning_rate`, `grpo.sampling.max_tokens`), so a
field violation the trainer sends (`spec.grpo.beta`) lands next to its input.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument
from services.trainer.domain import DatasetKind, Method
from services.trainer.methods import METHODS, MethodDef
from services.trainer.params import TrainingParams
from tlm.trainer.v1 import trainer_pb2 as pb

F = FieldDescriptor
NUMBER = {F.TYPE_DOUBLE, F.TYPE_FLOAT}
INTEGER = {F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_SINT32}
# The spec's plain fields, taken from inputs of the same name.
NAMES = ("base_model", "train_dataset", "eval_dataset", "evaluator", "output_model")
# Explicit resources: DevicePlan's fields, as inputs `resources.explicit.<field>`.
EXPLICIT = "resources.explicit."


@dataclass(frozen=True)
class Field:
    """One input of the form: `path` under the spec, its input type and its default."""

    path: str
    kind: str  # "int" | "number" | "bool" | "text" | "choice" | "list"
    default: str
    choices: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return "f-" + self.path.replace(".", "-")

    @property
    def label(self) -> str:
        return self.path.rsplit(".", 1)[-1].replace("_", " ")


def implemented() -> list[MethodDef]:
    return [m for m in METHODS.values() if m.implemented]


def method_def(value: str) -> MethodDef:
    """The method named by the form's `method` (`METHOD_GRPO` or `GRPO`).

    >>> method_def("METHOD_DPO").dataset.name
    'PREFERENCE'
    """
    number = proto_json.enum_number(pb.Method, value)
    return METHODS[Method(number)]


def dataset_kind(m: MethodDef) -> int:
    """The registry's DatasetKind number for the method's data (the enums mirror each other)."""
    return int(m.dataset)


def _field(desc: Descriptor, path: str) -> FieldDescriptor | None:
    """The proto field at `path` under the message `desc`, or None."""
    head, _, rest = path.partition(".")
    f = desc.fields_by_name.get(head)
    if f is None or not rest:
        return f
    return _field(f.message_type, rest) if f.message_type is not None else None


def _default(m: MethodDef, path: str) -> str:
    """The default shown for `path`, from the params dataclasses the trainer fills in."""
    group, _, rest = path.partition(".")
    if path == "training.learning_rate":
        return f"{m.default_learning_rate(False):g} full, {m.default_learning_rate(True):g} LoRA"
    value: Any = TrainingParams() if group == "training" else m.params()
    for part in rest.split("."):
        if not dataclasses.is_dataclass(value) or not hasattr(value, part):
            return ""
        value = getattr(value, part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _kind(f: FieldDescriptor) -> tuple[str, tuple[str, ...]]:
    if f.is_repeated:
        return "list", ()
    if f.type == F.TYPE_BOOL:
        return "bool", ()
    if f.type in NUMBER:
        return "number", ()
    if f.type in INTEGER:
        return "int", ()
    if f.type == F.TYPE_ENUM:
        assert f.enum_type is not None
        return "choice", tuple(v.name for v in f.enum_type.values if v.number)
    return "text", ()


def param_fields(m: MethodDef) -> list[Field]:
    """The advanced-parameter inputs of a method: every training or method-params path it reads,
    in proto order; nothing it would refuse.

    >>> [f.path for f in param_fields(method_def("GRPO")) if "sampling" in f.path][:3]
    ['grpo.sampling.n', 'grpo.sampling.temperature', 'grpo.sampling.top_p']
    """
    found: list[Field] = []

    def walk(desc: Descriptor, prefix: str) -> None:
        for f in desc.fields:
            path = f"{prefix}{f.name}"
            if f.message_type is not None and not f.is_repeated:
                walk(f.message_type, path + ".")
            elif path in m.reads and not (f.GetOptions().deprecated):
                kind, choices = _kind(f)
                found.append(Field(path, kind, _default(m, path), choices))

    walk(pb.TrainingParams.DESCRIPTOR, "training.")
    params = pb.TrainingJobSpec.DESCRIPTOR.fields_by_name[m.params_field].message_type
    assert params is not None
    walk(params, f"{m.params_field}.")
    return found


def explicit_fields() -> list[Field]:
    """The inputs of an explicit device plan."""
    out = []
    for f in pb.DevicePlan.DESCRIPTOR.fields:
        kind, choices = _kind(f)
        out.append(Field(EXPLICIT + f.name, kind, "", choices))
    return out


def _convert(f: FieldDescriptor, path: str, raw: str) -> Any:
    """A form string as the JSON value of field `f`; InvalidArgument naming `spec.<path>`."""
    kind, _ = _kind(f)
    try:
        if kind == "int":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        want = "a whole number" if kind == "int" else "a number"
        bad = FieldViolation(f"spec.{path}", f"must be {want}")
        raise InvalidArgument(f"spec.{path}: must be {want}", violations=[bad]) from None
    if kind == "bool":
        return raw in ("true", "on", "1")
    if kind == "list":
        return [s.strip() for s in raw.split(",") if s.strip()]
    return raw


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def spec_dict(form: Mapping[str, str]) -> dict[str, Any]:
    """The spec (proto JSON) of a submitted create-job form; blank inputs are left unset.

    >>> form = {"method": "METHOD_GRPO", "base_model": "models/m/revisions/latest",
    ...         "tuning": "full", "grpo.beta": "0", "grpo.sampling.max_tokens": "6",
    ...         "resources": "auto", "resources.auto.max_devices": "", "dpo.beta": "1"}
    >>> spec_dict(form)
    {'method': 'METHOD_GRPO', 'base_model': 'models/m/revisions/latest', 'tuning': {'full': {}}, \
'resources': {'auto': {}}, 'grpo': {'beta': 0.0, 'sampling': {'max_tokens': 6}}}
    """
    m = method_def(form.get("method", ""))
    spec: dict[str, Any] = {"method": f"METHOD_{m.name}"}
    for name in NAMES:
        if form.get(name):
            spec[name] = form[name]
    if form.get("tuning") == "full":
        spec["tuning"] = {"full": {}}
    elif form.get("tuning") == "lora":
        spec["tuning"] = {"lora": {}}
    allowed = {f.path for f in param_fields(m)} | {"tuning.lora.r", "tuning.lora.alpha_value"}
    allowed |= {f.path for f in explicit_fields()} | {"resources.auto.max_devices"}
    choice = form.get("resources")
    if choice in ("auto", "explicit"):
        spec["resources"] = {choice: {}}
    for path, raw in form.items():
        if path not in allowed or raw == "" or _skipped(path, spec):
            continue
        f = _field(pb.TrainingJobSpec.DESCRIPTOR, path)
        if f is not None:
            _put(spec, path, _convert(f, path, raw))
    return spec


def _skipped(path: str, spec: dict[str, Any]) -> bool:
    """Inputs of a choice not taken (LoRA settings under full tuning, the other resources)."""
    if path.startswith("tuning.lora."):
        return "lora" not in spec.get("tuning", {"lora": {}})
    if path.startswith("resources."):
        return path.split(".")[1] not in spec.get("resources", {})
    return False


def spec_message(spec: Mapping[str, Any]) -> pb.TrainingJobSpec:
    """The message; a value the proto refuses is InvalidArgument."""
    try:
        return json_format.ParseDict(dict(spec), pb.TrainingJobSpec())
    except json_format.ParseError as exc:
        raise InvalidArgument(f"spec: {exc}") from None


def pretty(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, indent=2)


KIND_WORDS = {k: k.name.lower() for k in DatasetKind}
