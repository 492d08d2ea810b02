"""Defaults and bounds of every evaluator field, one table each; `fill_defaults` and
`field_problems` apply them.

The defaults table feeds ListScorerTypes, so the form a UI renders and the spec the service runs
never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import FieldViolation
from services.specs.evaluator_json import enum_names, join, msg_type
from services.specs.sampling import MAX_TEMPERATURE
from tlm.reward.v1 import evaluator_pb2 as ev

# A nested message default of {} means "create it, then fill its own defaults".
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "tlm.reward.v1.EvaluatorSpec": {"aggregation": "AGGREGATION_WEIGHTED_SUM"},
    "tlm.reward.v1.Gate": {"min_value": 1.0, "on_unscorable": True},
    "tlm.reward.v1.ScorerSpec": {"weight": 1.0, "normalization": {}},
    "tlm.reward.v1.Normalization": {"scale": 1.0, "offset": 0.0},
    "tlm.reward.v1.TextNormalization": {"strip": True, "collapse_whitespace": True},
    "tlm.reward.v1.ExactMatchScorer": {"reference_field": "reference", "normalization": {}},
    "tlm.reward.v1.ContainsScorer": {
        "reference_field": "reference",
        "mode": "MATCH_MODE_ALL",
        "normalization": {},
    },
    "tlm.reward.v1.LengthScorer": {
        "unit": "LENGTH_UNIT_CHARACTERS",
        "min_length": 0,
        "penalty_per_unit": 0.01,
        "floor_value": 0.0,
    },
    "tlm.reward.v1.MathScorer": {"reference_field": "reference"},
    "tlm.reward.v1.CodeScorer": {
        "language": "CODE_LANGUAGE_PYTHON",
        "tests_field": "tests",
        "timeout": "10s",
        "cpu_seconds": 5,
        "memory_mb": 512,
        "max_processes": 16,
        "max_file_mb": 10,
    },
    "tlm.reward.v1.ModelScorer": {
        "max_length": 1024,
        "batch_size": 16,
        "apply_chat_template": True,
    },
    "tlm.reward.v1.HumanPreferenceScorer": {
        "kind": "REVIEW_KIND_RATING",
        "rating_min": 1.0,
        "rating_max": 5.0,
        "dataset": "human-preferences",
    },
    "tlm.reward.v1.JudgeScorer": {
        "score_pattern": r"(?i)score\s*[:=]\s*(-?[0-9.]+)",
        "score_min": 0.0,
        "score_max": 10.0,
        "max_tokens": 64,
    },
    "tlm.reward.v1.RemoteScorer": {
        "timeout": "10s",
        "max_retries": 2,
        "breaker_failures": 5,
        "breaker_reset": "30s",
    },
}

# The per-sample limit (ScorerSpec.timeout) when unset: 10s, longer for scorers that wait on
# something slower than a rule.
DEFAULT_TIMEOUT_S = 10.0
# Scorers that wait on something slower than a rule get a longer per-sample limit by default.
SCORER_TIMEOUT_S: Mapping[str, float] = {
    "code": 15.0,
    "model": 120.0,
    "judge": 120.0,
    "remote": 60.0,
    "human": 10.0,
}


@dataclass(frozen=True)
class Bound:
    """The closed range [low, high], or (low, high] with `open_low`; NaN is never inside."""

    low: float
    high: float
    open_low: bool = False
    unit: str = ""

    def problem(self, value: float) -> str | None:
        above_low = value > self.low if self.open_low else value >= self.low
        if above_low and value <= self.high:
            return None
        left = "(" if self.open_low else "["
        return f"must be in {left}{self.low:g}{self.unit}, {self.high:g}{self.unit}]"


# Weights, normalisation, gate and rating/score values: wide enough for any reward scale, and
# small enough that weight * clip(scale * raw + offset) summed over scorers stays finite.
MAGNITUDE = Bound(-1e6, 1e6)
# Per-sample and per-call time limits: longer is a stuck request, not a slow scorer.
MAX_TIMEOUT_S = 3600.0
SECONDS = Bound(0, MAX_TIMEOUT_S, open_low=True, unit="s")
# Characters, words or tokens of one completion.
MAX_LENGTH_UNITS = 10_000_000

# Every number and duration in the spec, by "<message>.<field>" (the import-time check below
# keeps this complete). Code limits are capped lower by the operator's settings; the remote
# breaker bounds are the ones remote.py enforces.
BOUNDS: Mapping[str, Bound] = {
    "Gate.min_value": MAGNITUDE,
    "Gate.reward": MAGNITUDE,
    "Normalization.scale": MAGNITUDE,
    "Normalization.offset": MAGNITUDE,
    "Normalization.clip_min": MAGNITUDE,
    "Normalization.clip_max": MAGNITUDE,
    "ScorerSpec.weight": MAGNITUDE,
    "ScorerSpec.timeout": SECONDS,
    "LengthScorer.min_length": Bound(0, MAX_LENGTH_UNITS),
    "LengthScorer.max_length": Bound(1, MAX_LENGTH_UNITS),
    "LengthScorer.penalty_per_unit": Bound(0, 1e6),
    "LengthScorer.floor_value": MAGNITUDE,
    "CodeScorer.timeout": Bound(0, 60, open_low=True, unit="s"),
    "CodeScorer.cpu_seconds": Bound(1, 60),
    "CodeScorer.memory_mb": Bound(64, 4096),
    "CodeScorer.max_processes": Bound(1, 64),
    "CodeScorer.max_file_mb": Bound(0, 100),
    "ModelScorer.max_length": Bound(1, 131_072),
    "ModelScorer.batch_size": Bound(1, 256),
    "HumanPreferenceScorer.rating_min": MAGNITUDE,
    "HumanPreferenceScorer.rating_max": MAGNITUDE,
    "JudgeScorer.score_min": MAGNITUDE,
    "JudgeScorer.score_max": MAGNITUDE,
    "JudgeScorer.max_tokens": Bound(1, 4096),
    "JudgeScorer.temperature": Bound(0, MAX_TEMPERATURE),  # what rollout accepts
    "RemoteScorer.timeout": SECONDS,
    "RemoteScorer.max_retries": Bound(0, 10),
    "RemoteScorer.breaker_failures": Bound(1, 20),
    "RemoteScorer.breaker_reset": Bound(1, 300, unit="s"),
}
NUMBER_TYPES = {
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
}
DURATION = "google.protobuf.Duration"


def field_problems(message: Message, path: str = "") -> list[FieldViolation]:
    """Every set number or duration outside its bound and every enum number the proto does
    not define, in `message` and the messages inside it, with JSON paths."""
    problems = []
    for fdesc, value in message.ListFields():
        where = join(path, fdesc.name)
        if fdesc.is_repeated:
            for i, item in enumerate(value):
                problems.extend(_value_problems(fdesc, item, join(where, i)))
        else:
            problems.extend(_value_problems(fdesc, value, where))
    return problems


def _value_problems(fdesc: FieldDescriptor, value: Any, path: str) -> list[FieldViolation]:
    if fdesc.type == FieldDescriptor.TYPE_ENUM:
        if value in fdesc.enum_type.values_by_number:  # type: ignore[union-attr]
            return []
        names = ", ".join(enum_names(fdesc))
        return [FieldViolation(path, f"unknown value {value}; expected one of {names}")]
    if fdesc.type == FieldDescriptor.TYPE_MESSAGE:
        kind = msg_type(fdesc).full_name
        if kind == DURATION:
            value = duration_s(value)
        elif kind.startswith("google.protobuf."):
            return []  # a Struct: its size is checked with the JSON (spec_json)
        else:
            return field_problems(value, path)
    bound = BOUNDS.get(_key(fdesc))
    why = bound.problem(value) if bound is not None else None
    return [FieldViolation(path, why)] if why else []


def _key(fdesc: FieldDescriptor) -> str:
    return f"{fdesc.containing_type.name}.{fdesc.name}"  # type: ignore[union-attr]


def _bounded_fields(descriptor: Descriptor, seen: set[str]) -> set[str]:
    """ "<message>.<field>" of every number and duration reachable from `descriptor`."""
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    found = set()
    for fdesc in descriptor.fields:
        if fdesc.type in NUMBER_TYPES:
            found.add(_key(fdesc))
        elif fdesc.type == FieldDescriptor.TYPE_MESSAGE:
            if msg_type(fdesc).full_name == DURATION:
                found.add(_key(fdesc))
            elif not msg_type(fdesc).full_name.startswith("google.protobuf."):
                found |= _bounded_fields(msg_type(fdesc), seen)
    return found


assert _bounded_fields(ev.EvaluatorSpec.DESCRIPTOR, set()) == set(BOUNDS), (
    "every number and duration of EvaluatorSpec needs exactly one entry in BOUNDS"
)


def fill_defaults(message: Message) -> None:
    """Set every unset field that has a default, recursively, in place."""
    defaults = DEFAULTS.get(message.DESCRIPTOR.full_name, {})
    for name, default in defaults.items():
        _fill_field(message, message.DESCRIPTOR.fields_by_name[name], default)  # type: ignore[arg-type]
    if isinstance(message, ev.ScorerSpec) and not message.HasField("timeout"):
        kind = message.WhichOneof("scorer") or ""
        message.timeout.FromTimedelta(
            timedelta(seconds=SCORER_TIMEOUT_S.get(kind, DEFAULT_TIMEOUT_S))
        )
    for fdesc, value in message.ListFields():
        if fdesc.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if msg_type(fdesc).full_name.startswith("google.protobuf."):
            continue
        if fdesc.is_repeated:
            for item in value:
                fill_defaults(item)
        else:
            fill_defaults(value)


def _fill_field(message: Message, fdesc: FieldDescriptor, default: Any) -> None:
    if fdesc.type == FieldDescriptor.TYPE_MESSAGE:
        if message.HasField(fdesc.name):
            return
        child = getattr(message, fdesc.name)
        if msg_type(fdesc).full_name == "google.protobuf.Duration":
            child.FromJsonString(default)
        else:
            child.SetInParent()
        return
    if fdesc.has_presence:
        if message.HasField(fdesc.name):
            return
    elif getattr(message, fdesc.name):
        return  # a proto3 plain scalar that the spec set to a non-zero value
    if fdesc.type == FieldDescriptor.TYPE_ENUM:
        default = fdesc.enum_type.values_by_name[default].number  # type: ignore[union-attr]
        current = getattr(message, fdesc.name)
        if current:
            return
    setattr(message, fdesc.name, default)


def default_json(message_name: str, field: str) -> Any:
    """The default of `field` in message `message_name`, or None."""
    return DEFAULTS.get(message_name, {}).get(field)


def duration_s(d: duration_pb2.Duration) -> float:
    return float(d.seconds) + d.nanos / 1e9
