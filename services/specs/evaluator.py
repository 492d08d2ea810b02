"""Evaluator spec validation: every error with its JSON path, and the normalised spec. Pure (no
scorer runtime): the registry validates specs it stores with it, the reward service specs it
runs.

`validate_json` (text from users) and `validate_spec` (a message) both collect all problems;
`require_valid` raises EvaluatorInvalid for callers that only want a runnable spec. Sizes are
checked first (evaluator_json), single fields against the bounds table (evaluator_defaults),
then what involves several fields or other rules (RE2, JSON Schema, resource names) here.
CPU-bound: services run it off the event loop.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import re2
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument
from services.specs import json_schema
from services.specs.evaluator_defaults import BOUNDS, field_problems, fill_defaults
from services.specs.evaluator_json import (
    MAX_SPEC_BYTES,
    finite,
    join,
    load_json,
    object_extent_problem,
    prune_message,
)
from services.specs.names import Collection, check_id, parse_revision
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import evaluator_pb2 as ev

NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
TAG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_CODE_TIMEOUT_S = BOUNDS["CodeScorer.timeout"].high
SCORER_TYPES = tuple(f.name for f in ev.ScorerSpec.DESCRIPTOR.oneofs_by_name["scorer"].fields)

Errors = list[FieldViolation]


class EvaluatorInvalid(InvalidArgument):
    """An evaluator spec has errors; each violation's field is a JSON path."""

    reason = common_pb2.EVALUATOR_INVALID

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        first = violations[0] if violations else FieldViolation("", "invalid")
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"{first.field}: {first.description}{more}", violations=violations)


@dataclass
class Validation:
    errors: Errors = field(default_factory=list)
    normalized: ev.EvaluatorSpec | None = None

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def normalized_json(self) -> str:
        if self.normalized is None:
            return ""
        return to_json(self.normalized)


def to_json(spec: Message) -> str:
    return json_format.MessageToJson(spec, preserving_proto_field_name=True, indent=2)


def validate_json(text: str) -> Validation:
    """Parse evaluator JSON text; report every structural and semantic error with its path."""
    data, problems = load_json(text)
    if problems:
        return Validation(problems)
    # Specs written before the enum rename (`"unit": "WORDS"`) load with today's names.
    data = proto_json.upgrade_enums(data, ev.EvaluatorSpec.DESCRIPTOR)
    errors, cleaned = prune_message(data, ev.EvaluatorSpec.DESCRIPTOR, "")
    spec = ev.EvaluatorSpec()
    try:
        json_format.ParseDict(cleaned, spec)
    except json_format.ParseError as exc:
        return Validation([*errors, FieldViolation("$", str(exc))])
    result = validate_spec(spec)
    if errors:
        return Validation([*errors, *result.errors])
    return result


def validate_spec(spec: ev.EvaluatorSpec, path: str = "") -> Validation:
    """Semantic checks of a parsed spec; the normalised copy (defaults filled) when valid."""
    size = spec.ByteSize()
    if size > MAX_SPEC_BYTES:
        why = f"the spec is {size / 1024:.0f} KiB; at most {MAX_SPEC_BYTES // 1024} KiB"
        return Validation([FieldViolation(path or "$", why)])
    errors = [*field_problems(spec, path), *check_spec(spec, path)]
    if errors:
        return Validation(errors)
    normalized = ev.EvaluatorSpec()
    normalized.CopyFrom(spec)
    fill_defaults(normalized)
    return Validation([], normalized)


def require_valid(spec: ev.EvaluatorSpec) -> ev.EvaluatorSpec:
    """The normalised spec, or EvaluatorInvalid. Every Score call resolves its spec (JSON Schema
    checks can take ~0.4 s), so outcomes are cached by the spec's bytes; an oversized spec is
    refused by `validate_spec` without becoming a cache key."""
    if spec.ByteSize() > MAX_SPEC_BYTES:
        raise EvaluatorInvalid(validate_spec(spec).errors)
    normalized, errors = _validated(spec.SerializeToString(deterministic=True))
    if normalized is None:
        raise EvaluatorInvalid(errors)
    return ev.EvaluatorSpec.FromString(normalized)  # a fresh copy: callers may change it


@functools.lru_cache(maxsize=256)
def _validated(data: bytes) -> tuple[bytes | None, tuple[FieldViolation, ...]]:
    """validate_spec's outcome for a serialized spec: the normalised spec's bytes, or errors."""
    result = validate_spec(ev.EvaluatorSpec.FromString(data))
    if result.normalized is None:
        return None, tuple(result.errors)
    return result.normalized.SerializeToString(deterministic=True), ()


def check_spec(spec: ev.EvaluatorSpec, path: str = "") -> Errors:
    """What the bounds table cannot see: required fields, names, references between scorers."""
    errors: Errors = []
    at = lambda *keys: _path(path, *keys)  # noqa: E731
    if not spec.scorers:
        errors.append(FieldViolation(at("scorers"), "at least one scorer is required"))
    names: dict[str, int] = {}
    for i, scorer in enumerate(spec.scorers):
        errors.extend(_check_scorer(scorer, spec, at("scorers", i)))
        if scorer.name in names:
            errors.append(
                FieldViolation(
                    at("scorers", i, "name"),
                    f"duplicate scorer name {scorer.name!r} (also scorers[{names[scorer.name]}])",
                )
            )
        names.setdefault(scorer.name, i)
    for i, scorer in enumerate(spec.scorers):
        if scorer.fallback and scorer.fallback not in names:
            errors.append(FieldViolation(at("scorers", i, "fallback"), _unknown(scorer.fallback)))
        elif scorer.fallback == scorer.name and scorer.name:
            errors.append(FieldViolation(at("scorers", i, "fallback"), "cannot be itself"))
        elif scorer.fallback and not spec.scorers[names[scorer.fallback]].monitor_only:
            # A counted fallback would count twice (for itself and as the stand-in), so the
            # reward's scale would jump whenever the primary fails.
            errors.append(
                FieldViolation(
                    at("scorers", i, "fallback"),
                    f"the fallback {scorer.fallback!r} must be monitor_only",
                )
            )
    errors.extend(_check_fallback_cycles(spec, at))
    for i, gate in enumerate(spec.gates):
        if gate.scorer not in names:
            errors.append(FieldViolation(at("gates", i, "scorer"), _unknown(gate.scorer)))
    errors.extend(_check_aggregation(spec, at))
    return errors


def _path(base: str, *keys: str | int) -> str:
    for key in keys:
        base = join(base, key)
    return base


def _unknown(name: str) -> str:
    return f"names no scorer in this spec: {name!r}"


def _check_scorer(scorer: ev.ScorerSpec, spec: ev.EvaluatorSpec, path: str) -> Errors:
    errors: Errors = []
    if not NAME_RE.match(scorer.name):
        errors.append(FieldViolation(join(path, "name"), "must match [a-z0-9_-]{1,64}"))
    if scorer.weight < 0 and spec.aggregation == ev.AGGREGATION_WEIGHTED_MEAN:
        errors.append(
            FieldViolation(join(path, "weight"), "must be >= 0 with WEIGHTED_MEAN aggregation")
        )
    errors.extend(_check_normalization(scorer.normalization, join(path, "normalization")))
    kind = scorer.WhichOneof("scorer")
    if kind is None:
        errors.append(
            FieldViolation(path, f"no scorer type; set one of: {', '.join(SCORER_TYPES)}")
        )
        return errors
    errors.extend(TYPE_CHECKS[kind](getattr(scorer, kind), join(path, kind)))
    return errors


def _check_normalization(norm: ev.Normalization, path: str) -> Errors:
    if norm.HasField("clip_min") and norm.HasField("clip_max") and norm.clip_min > norm.clip_max:
        return [FieldViolation(join(path, "clip_max"), "must be >= clip_min")]
    return []


def _check_fallback_cycles(spec: ev.EvaluatorSpec, at: Callable[..., str]) -> Errors:
    fallback = {s.name: s.fallback for s in spec.scorers if s.fallback}
    errors: Errors = []
    for i, scorer in enumerate(spec.scorers):
        seen, current = {scorer.name}, fallback.get(scorer.name)
        while current and current in fallback and current != scorer.name:
            if current in seen:
                break
            seen.add(current)
            current = fallback[current]
        if current == scorer.name and fallback.get(scorer.name) != scorer.name:
            errors.append(FieldViolation(at("scorers", i, "fallback"), "fallbacks form a cycle"))
    return errors


def _check_aggregation(spec: ev.EvaluatorSpec, at: Callable[..., str]) -> Errors:
    aggregated = [s for s in spec.scorers if not s.monitor_only]
    if spec.scorers and not aggregated:
        return [FieldViolation(at("scorers"), "every scorer is monitor_only; nothing to aggregate")]
    if spec.aggregation == ev.AGGREGATION_WEIGHTED_MEAN:
        total = sum(s.weight if s.HasField("weight") else 1.0 for s in aggregated)
        if aggregated and total <= 0:
            return [FieldViolation(at("aggregation"), "WEIGHTED_MEAN needs weights summing > 0")]
    return []


# Per-type checks -----------------------------------------------------------------------------


def _check_regex(msg: ev.RegexScorer, path: str) -> Errors:
    if not msg.pattern:
        return [FieldViolation(join(path, "pattern"), "is required")]
    problem = re2_problem(msg.pattern)
    return [FieldViolation(join(path, "pattern"), problem)] if problem else []


def re2_problem(pattern: str, min_groups: int = 0) -> str | None:
    """Why RE2 refuses `pattern` (backreferences, lookaround, bad syntax), or None."""
    try:
        compiled = re2.compile(pattern)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        return f"not a valid RE2 pattern ({detail}); backreferences and lookaround are unsupported"
    if compiled.groups < min_groups:
        return f"needs at least {min_groups} capturing group(s)"
    return None


def _check_json(msg: ev.JsonScorer, path: str) -> Errors:
    if not msg.HasField("schema"):
        return []
    try:
        schema = json_format.MessageToDict(msg.schema)
    except RecursionError:  # only a message built in process can nest this deep
        return [FieldViolation(join(path, "schema"), "nested too deeply")]
    # The size first: the schema check below takes time in proportion to the schema.
    too_big = object_extent_problem(schema)
    if too_big:
        return [FieldViolation(join(path, "schema"), too_big)]
    try:
        # The scorer's own check: RE2 patterns, no reference outside the schema.
        json_schema.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = _path(join(path, "schema"), *list(exc.absolute_path))
        return [FieldViolation(where, f"not a valid JSON Schema: {exc.message}")]
    except json_schema.SchemaUnusable as exc:
        return [FieldViolation(join(path, "schema"), str(exc))]
    return []


def _check_length(msg: ev.LengthScorer, path: str) -> Errors:
    if msg.max_length == 0:
        return [FieldViolation(join(path, "max_length"), "is required and must be > 0")]
    if msg.max_length > 0 and msg.min_length > msg.max_length:
        return [FieldViolation(join(path, "min_length"), "must be <= max_length")]
    return []


def _check_format(msg: ev.FormatScorer, path: str) -> Errors:
    if not msg.tags:
        return [FieldViolation(join(path, "tags"), "at least one tag is required")]
    return [
        FieldViolation(join(join(path, "tags"), i), "must be a tag name such as 'answer'")
        for i, tag in enumerate(msg.tags)
        if not TAG_RE.match(tag)
    ]


def _check_extraction_tag(msg: Message, path: str) -> Errors:
    extraction = getattr(msg, "extraction", None)
    if extraction is not None and extraction.tag and not TAG_RE.match(extraction.tag):
        return [FieldViolation(join(path, "extraction.tag"), "must be a tag name")]
    return []


def _registry_name(value: str, collection: Collection | None, path: str) -> Errors:
    """The registry's own rule for an id (collection None) or a revision name such as
    `models/rm/revisions/latest`, as errors: its ids can never become a path."""
    try:
        if collection is None:
            check_id(value, path)
        else:
            parse_revision(value, collection, path)
    except InvalidArgument as exc:
        return exc.violations
    return []


def _check_model(msg: ev.ModelScorer, path: str) -> Errors:
    where = join(path, "model_revision")
    if not msg.model_revision:
        return [
            FieldViolation(where, "is required: a revision such as 'models/rm/revisions/latest'")
        ]
    return _registry_name(msg.model_revision, Collection.MODELS, where)


def _check_human(msg: ev.HumanPreferenceScorer, path: str) -> Errors:
    # The dataset becomes a registry name for the caller's team when an answer is appended.
    errors = _registry_name(msg.dataset, None, join(path, "dataset")) if msg.dataset else []
    low = msg.rating_min if msg.HasField("rating_min") else 1.0
    high = msg.rating_max if msg.HasField("rating_max") else 5.0
    if finite(low) and finite(high) and not low < high:
        errors.append(FieldViolation(join(path, "rating_max"), "must be greater than rating_min"))
    return errors


def _check_judge(msg: ev.JudgeScorer, path: str) -> Errors:
    errors: Errors = []
    if not msg.rubric.strip():
        errors.append(FieldViolation(join(path, "rubric"), "is required"))
    if msg.score_pattern:
        problem = re2_problem(msg.score_pattern, min_groups=1)
        if problem:
            errors.append(FieldViolation(join(path, "score_pattern"), problem))
    for name in ("model_revision", "adapter_revision"):
        if getattr(msg, name):
            errors.extend(_registry_name(getattr(msg, name), Collection.MODELS, join(path, name)))
    low = msg.score_min if msg.HasField("score_min") else 0.0
    high = msg.score_max if msg.HasField("score_max") else 10.0
    if finite(low) and finite(high) and not low < high:
        errors.append(FieldViolation(join(path, "score_max"), "must be greater than score_min"))
    return errors


def _check_remote(msg: ev.RemoteScorer, path: str) -> Errors:
    errors: Errors = []
    if not msg.address:
        errors.append(FieldViolation(join(path, "address"), "is required (host:port)"))
    if bool(msg.evaluator) == msg.HasField("spec"):
        errors.append(FieldViolation(join(path, "evaluator"), "set exactly one of evaluator, spec"))
    elif msg.evaluator:
        where = join(path, "evaluator")
        errors.extend(_registry_name(msg.evaluator, Collection.EVALUATORS, where))
    if msg.HasField("spec"):
        errors.extend(check_spec(msg.spec, join(path, "spec")))
    return errors


def _both(*checks: Callable[[Any, str], Errors]) -> Callable[[Message, str], Errors]:
    def run(msg: Message, path: str) -> Errors:
        return [e for check in checks for e in check(msg, path)]

    return run


TYPE_CHECKS: dict[str, Callable[[Message, str], Errors]] = {
    "exact_match": _check_extraction_tag,
    "contains": _check_extraction_tag,
    "regex": _both(_check_regex, _check_extraction_tag),
    "json": _both(_check_json, _check_extraction_tag),
    "length": _check_length,  # type: ignore[dict-item]
    "format": _check_format,  # type: ignore[dict-item]
    "math": _check_extraction_tag,
    "code": _check_extraction_tag,
    "model": _check_model,  # type: ignore[dict-item]
    "human": _check_human,  # type: ignore[dict-item]
    "judge": _check_judge,  # type: ignore[dict-item]
    "remote": _check_remote,  # type: ignore[dict-item]
}
assert set(TYPE_CHECKS) == set(SCORER_TYPES), "every scorer type needs a check entry"
