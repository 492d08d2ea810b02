"""The scorer catalogue behind ListScorerTypes: one table describing each scorer type; the
parameter lists come from the spec descriptors and the defaults table, so they cannot drift."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.specs.evaluator_defaults import BOUNDS, DEFAULT_TIMEOUT_S, DEFAULTS, SCORER_TIMEOUT_S
from services.specs.evaluator_json import enum_names, msg_type
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs

F = FieldDescriptor


@dataclass(frozen=True)
class ScorerInfo:
    family: int
    description: str
    deterministic: bool
    example: Mapping[str, object]
    required: tuple[str, ...] = ()


# Scorer families, short for the table below.
RULE, MODEL, HUMAN = rs.SCORER_FAMILY_RULE, rs.SCORER_FAMILY_MODEL, rs.SCORER_FAMILY_HUMAN
JUDGE, REMOTE = rs.SCORER_FAMILY_JUDGE, rs.SCORER_FAMILY_REMOTE
SCORERS: Mapping[str, ScorerInfo] = {
    "exact_match": ScorerInfo(RULE, "1.0 when the completion equals the reference.", True,
                              {"reference_field": "reference", "extraction": {"tag": "answer"}}),
    "contains": ScorerInfo(RULE, "Whether the completion contains substrings.", True,
                           {"substrings": ["because"], "mode": "MATCH_MODE_ANY"}),
    "regex": ScorerInfo(RULE, "Matches an RE2 pattern (linear time).", True,
                        {"pattern": "^Answer: [0-9]+$", "full_match": True}, ("pattern",)),
    "json": ScorerInfo(RULE, "Valid JSON, optionally conforming to a JSON Schema.", True,
                       {"schema": {"type": "object", "required": ["name"]}}),
    "length": ScorerInfo(RULE, "1.0 inside the length bounds, penalised outside.", True,
                         {"unit": "LENGTH_UNIT_WORDS", "min_length": 20, "max_length": 200},
                         ("max_length",)),
    "format": ScorerInfo(RULE, "Tags such as <think>...</think><answer>...</answer>.", True,
                         {"tags": ["think", "answer"]}, ("tags",)),
    "math": ScorerInfo(RULE, "Answer equivalent to the reference (math-verify).", True,
                       {"reference_field": "reference", "extraction": {"tag": "answer"}}),
    "code": ScorerInfo(RULE, "Runs the code with the row's tests in a sandbox.", False,
                       {"tests_field": "tests", "timeout": "5s", "memory_mb": 256}),
    "model": ScorerInfo(MODEL, "A sequence-classification reward model's logit.", False,
                        {"model_revision": "models/rm/revisions/latest"}, ("model_revision",)),
    "human": ScorerInfo(HUMAN, "People answer a review queue (rating or pairwise).", False,
                        {"kind": "REVIEW_KIND_RATING", "instructions": "Rate helpfulness 1-5."}),
    "judge": ScorerInfo(JUDGE, "A rubric prompt to a model served by rollout.", False,
                        {"rubric": "Rate 0-10.\n{prompt}\n{completion}\nAnswer 'Score: N'."},
                        ("rubric",)),
    "remote": ScorerInfo(REMOTE, "Another team's reward service, by address.", False,
                         {"address": "rm.team-b:50051", "evaluator": "evaluators/e/revisions/1"},
                         ("address",)),
}  # fmt: skip

# Descriptions of parameters, by "<message>.<field>"; ranges where they are enforced.
DOCS: Mapping[str, str] = {
    "ScorerSpec.name": "Unique name in the spec, [a-z0-9_-]{1,64}.",
    "ScorerSpec.weight": "Weight in the aggregation.",
    "ScorerSpec.normalization": "value = clip(scale * raw + offset, clip_min, clip_max).",
    "ScorerSpec.timeout": "Per-sample time limit.",
    "ScorerSpec.fallback": "Scorer used when this one cannot score a sample.",
    "ScorerSpec.monitor_only": "Computed and reported but not aggregated.",
    "Normalization.scale": "Multiplier.",
    "Normalization.offset": "Added after scaling.",
    "Normalization.clip_min": "Lower bound after scaling.",
    "Normalization.clip_max": "Upper bound after scaling.",
    "Extraction.tag": "Only the text inside the last <tag>...</tag>.",
    "Extraction.code_block": "Only the last ``` fenced code block.",
    "TextNormalization.strip": "Strip surrounding whitespace.",
    "TextNormalization.lowercase": "Compare case-insensitively.",
    "TextNormalization.collapse_whitespace": "Collapse whitespace runs.",
    "TextNormalization.remove_punctuation": "Remove punctuation.",
}
SCALAR_TYPES = {
    F.TYPE_STRING: rs.PARAMETER_TYPE_STRING,
    F.TYPE_BOOL: rs.PARAMETER_TYPE_BOOLEAN,
    F.TYPE_DOUBLE: rs.PARAMETER_TYPE_NUMBER,
    F.TYPE_FLOAT: rs.PARAMETER_TYPE_NUMBER,
    F.TYPE_INT32: rs.PARAMETER_TYPE_INTEGER,
    F.TYPE_INT64: rs.PARAMETER_TYPE_INTEGER,
    F.TYPE_ENUM: rs.PARAMETER_TYPE_ENUM,
}
SPECIAL_MESSAGES = {
    "google.protobuf.Duration": rs.PARAMETER_TYPE_DURATION,
    "google.protobuf.Struct": rs.PARAMETER_TYPE_JSON_OBJECT,
    "tlm.reward.v1.EvaluatorSpec": rs.PARAMETER_TYPE_JSON_OBJECT,
}


def parameters(
    descriptor: Descriptor, prefix: str = "", required: tuple[str, ...] = ()
) -> list[rs.ParameterInfo]:
    """Every field of `descriptor` as ParameterInfo, nested messages with dotted names."""
    params = []
    for f in descriptor.fields:
        if f.containing_oneof is not None and f.containing_oneof.name == "scorer":
            continue
        name = prefix + f.name
        key = f"{descriptor.name}.{f.name}"
        info = rs.ParameterInfo(
            name=name, required=f.name in required, description=DOCS.get(key, "")
        )
        if f.type == F.TYPE_MESSAGE:
            info.type = SPECIAL_MESSAGES.get(msg_type(f).full_name, rs.PARAMETER_TYPE_MESSAGE)  # type: ignore[assignment]
        elif f.is_repeated:
            info.type = rs.PARAMETER_TYPE_STRING_LIST
        else:
            info.type = SCALAR_TYPES[f.type]  # type: ignore[assignment]
        if f.type == F.TYPE_ENUM:
            info.enum_values.extend(n for n in enum_names(f) if not n.endswith("_UNSPECIFIED"))
        default = DEFAULTS.get(descriptor.full_name, {}).get(f.name)
        if default is not None and default != {}:
            info.default_json = json.dumps(default)
        bound = BOUNDS.get(key)  # the validator's own ranges (durations in seconds)
        if bound is not None:
            info.maximum = bound.high
            if not bound.open_low:  # "above 0s" has no lowest allowed value to report
                info.minimum = bound.low
        params.append(info)
        if info.type == rs.PARAMETER_TYPE_MESSAGE:
            params.extend(parameters(msg_type(f), name + "."))
    return params


def _fill_docs(params: list[rs.ParameterInfo], kind: str) -> None:
    for p in params:
        if not p.description:
            p.description = f"{p.name} of the {kind} scorer (see services/reward/README.md)."


def scorer_types() -> rs.ListScorerTypesResponse:
    response = rs.ListScorerTypesResponse()
    common = parameters(ev.ScorerSpec.DESCRIPTOR, required=("name",))
    for p in common:
        if p.name == "timeout":
            p.default_json = json.dumps(f"{DEFAULT_TIMEOUT_S:g}s")
    response.common_parameters.extend(common)
    oneof = ev.ScorerSpec.DESCRIPTOR.oneofs_by_name["scorer"]
    for f in oneof.fields:
        info = SCORERS[f.name]
        params = parameters(msg_type(f), required=info.required)
        _fill_docs(params, f.name)
        example = {"name": f"my-{f.name}".replace("_", "-"), "weight": 1.0, f.name: info.example}
        if f.name in SCORER_TIMEOUT_S:
            example["timeout"] = f"{SCORER_TIMEOUT_S[f.name]:g}s"
        response.scorer_types.append(
            rs.ScorerType(
                type=f.name,
                family=info.family,  # type: ignore[arg-type]
                description=info.description,
                parameters=params,
                example_json=json.dumps(example, indent=2),
                deterministic=info.deterministic,
            )
        )
    return response
