"""Evaluator validation: every error with its JSON path; defaults filled in when valid."""

from __future__ import annotations

import json

from services.specs.evaluator import validate_json, validate_spec
from tlm.reward.v1 import evaluator_pb2 as ev


def paths(spec: object) -> dict[str, str]:
    result = validate_json(json.dumps(spec))
    assert not result.valid
    return {e.field: e.description for e in result.errors}


def test_every_error_is_reported_with_its_path() -> None:
    spec = {
        "scorers": [
            {"name": "fmt", "format": {"tags": ["think", "answer"]}},
            {"name": "fmt", "regex": {"pattern": "(a)\\1"}},
            {"name": "r", "regex": {"pattern": "x", "bogus": 1}, "weight": "heavy"},
            {"name": "w", "wizard": {}},
            {"name": "remote", "remote": {"evaluator": "evaluators/e/revisions/1"}},
            {"name": "rm", "model": {}},
            {"name": "schema", "json": {"schema": {"type": "nope"}}},
            {"name": "slow", "timeout": "-1s", "length": {"max_length": 5}},
        ],
        "gates": [{"scorer": "missing", "reward": -1}],
    }
    errors = paths(spec)
    assert set(errors) == {
        "scorers[1].regex.pattern",
        "scorers[1].name",
        "scorers[2].regex.bogus",
        "scorers[2].weight",
        "scorers[3].wizard",
        "scorers[3]",
        "scorers[4].remote.address",
        "scorers[5].model.model_revision",
        "scorers[6].json.schema.type",
        "scorers[7].timeout",
        "gates[0].scorer",
    }
    assert "backreferences" in errors["scorers[1].regex.pattern"]
    assert "duplicate" in errors["scorers[1].name"]
    assert "unknown field" in errors["scorers[2].regex.bogus"]
    assert "expected a number" in errors["scorers[2].weight"]
    assert "unknown scorer type" in errors["scorers[3].wizard"]


def test_lookaround_and_wrong_types_and_fallbacks() -> None:
    errors = paths(
        {
            "aggregation": "MEDIAN",
            "scorers": [
                {"name": "a", "regex": {"pattern": "(?=x)"}, "fallback": "b"},
                {"name": "b", "exact_match": {}, "fallback": "a", "monitor_only": "yes"},
                {"name": "c", "contains": {"substrings": "x"}, "fallback": "nope"},
            ],
        }
    )
    assert "MEDIAN" in errors["aggregation"]
    assert "scorers[0].regex.pattern" in errors
    assert errors["scorers[1].monitor_only"] == "expected true or false, got a string"
    assert errors["scorers[2].contains.substrings"] == "expected a list, got a string"
    assert "nope" in errors["scorers[2].fallback"]
    assert errors["scorers[0].fallback"] == "fallbacks form a cycle"


def test_not_json_and_not_an_object() -> None:
    assert "not JSON" in validate_json("{").errors[0].description
    assert validate_json("[]").errors[0].field == "$"


def test_weighted_mean_refuses_negative_weights() -> None:
    errors = paths(
        {"aggregation": "WEIGHTED_MEAN", "scorers": [{"name": "a", "weight": -1, "math": {}}]}
    )
    assert "scorers[0].weight" in errors


def test_normalised_json_fills_defaults() -> None:
    result = validate_json(
        json.dumps(
            {
                "scorers": [
                    {"name": "fmt", "format": {"tags": ["answer"]}},
                    {"name": "ok", "exact_match": {}},
                    {"name": "run", "code": {}},
                ],
                "gates": [{"scorer": "fmt", "reward": -1}],
            }
        )
    )
    assert result.valid, result.errors
    data = json.loads(result.normalized_json)
    assert data["aggregation"] == "AGGREGATION_WEIGHTED_SUM"
    assert data["gates"][0] == {
        "scorer": "fmt",
        "reward": -1.0,
        "min_value": 1.0,
        "on_unscorable": True,
    }
    fmt, exact, code = data["scorers"]
    assert fmt["weight"] == 1.0 and fmt["timeout"] == "10s"
    assert fmt["normalization"] == {"scale": 1.0, "offset": 0.0}
    assert exact["exact_match"]["normalization"] == {"strip": True, "collapse_whitespace": True}
    assert exact["exact_match"]["reference_field"] == "reference"
    assert code["timeout"] == "15s"
    assert code["code"]["memory_mb"] == 512 and code["code"]["tests_field"] == "tests"


def test_explicit_values_survive_normalisation() -> None:
    spec = ev.EvaluatorSpec(
        scorers=[ev.ScorerSpec(name="n", weight=0.0, length=ev.LengthScorer(max_length=5))]
    )
    spec.scorers[0].timeout.FromJsonString("2s")
    spec.scorers[0].length.penalty_per_unit = 0.0
    normalized = validate_spec(spec).normalized
    assert normalized is not None
    scorer = normalized.scorers[0]
    assert scorer.weight == 0.0 and scorer.timeout.seconds == 2
    assert scorer.length.penalty_per_unit == 0.0


def test_remote_inline_spec_is_validated_with_nested_paths() -> None:
    errors = paths(
        {
            "scorers": [
                {"name": "r", "remote": {"address": "h:1", "spec": {"scorers": [{"name": "x"}]}}}
            ]
        }
    )
    assert "scorers[0].remote.spec.scorers[0]" in errors


def test_a_fallback_must_be_monitor_only() -> None:
    """A counted fallback would count twice when it stands in, so the spec is refused."""
    scorers = [
        {"name": "judge", "regex": {"pattern": "x"}, "fallback": "rule"},
        {"name": "rule", "regex": {"pattern": "y"}},
    ]
    result = validate_json(json.dumps({"scorers": scorers}))
    assert [(e.field, e.description) for e in result.errors] == [
        ("scorers[0].fallback", "the fallback 'rule' must be monitor_only")
    ]
    scorers[1]["monitor_only"] = True
    assert validate_json(json.dumps({"scorers": scorers})).valid
