"""Defaults of every evaluator field, in one table, and `fill_defaults` that applies them.

The same table feeds ListScorerTypes, so the form a UI renders and the spec the service runs
never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.reward.spec_json import msg_type
from tlm.reward.v1 import evaluator_pb2 as ev

# A nested message default of {} means "create it, then fill its own defaults".
DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "tlm.reward.v1.EvaluatorSpec": {"aggregation": "WEIGHTED_SUM"},
    "tlm.reward.v1.Gate": {"min_value": 1.0, "on_unscorable": True},
    "tlm.reward.v1.ScorerSpec": {"weight": 1.0, "normalization": {}},
    "tlm.reward.v1.Normalization": {"scale": 1.0, "offset": 0.0},
    "tlm.reward.v1.TextNormalization": {"strip": True, "collapse_whitespace": True},
    "tlm.reward.v1.ExactMatchScorer": {"reference_field": "reference", "normalization": {}},
    "tlm.reward.v1.ContainsScorer": {
        "reference_field": "reference",
        "mode": "ALL",
        "normalization": {},
    },
    "tlm.reward.v1.LengthScorer": {
        "unit": "CHARACTERS",
        "min_length": 0,
        "penalty_per_unit": 0.01,
        "floor_value": 0.0,
    },
    "tlm.reward.v1.MathScorer": {"reference_field": "reference"},
    "tlm.reward.v1.CodeScorer": {
        "language": "PYTHON",
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
        "kind": "RATING",
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
