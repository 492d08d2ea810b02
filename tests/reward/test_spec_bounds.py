"""Sizes, enums and the bounds table: every number, duration and enum of the evaluator spec is
checked with its JSON path, and big or deep specs are refused before any expensive work."""

from __future__ import annotations

import copy
import json
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.devtools.server_thread import ServerThread
from services.specs.evaluator import validate_json, validate_spec
from services.specs.evaluator_defaults import BOUNDS, Bound
from services.specs.evaluator_json import (
    MAX_MESSAGE_DEPTH,
    MAX_OBJECT_DEPTH,
    MAX_SPEC_BYTES,
    msg_type,
)
from tests.reward.helpers import spec
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

# A minimal valid spec holding each message of EvaluatorSpec, and where that message sits.
MATH = {"name": "a", "math": {}}
EVALUATOR = "evaluators/e/revisions/r1"
BASES: dict[str, tuple[dict[str, Any], tuple[str | int, ...]]] = {
    "EvaluatorSpec": ({"scorers": [MATH]}, ()),
    "Gate": ({"scorers": [MATH], "gates": [{"scorer": "a"}]}, ("gates", 0)),
    "ScorerSpec": ({"scorers": [MATH]}, ("scorers", 0)),
    "Normalization": ({"scorers": [MATH | {"normalization": {}}]}, ("scorers", 0, "normalization")),
    "ContainsScorer": ({"scorers": [{"name": "a", "contains": {}}]}, ("scorers", 0, "contains")),
    "LengthScorer": (
        {"scorers": [{"name": "a", "length": {"max_length": 10_000_000}}]},
        ("scorers", 0, "length"),
    ),
    "CodeScorer": ({"scorers": [{"name": "a", "code": {}}]}, ("scorers", 0, "code")),
    "ModelScorer": (
        {"scorers": [{"name": "a", "model": {"model_revision": "models/rm/revisions/latest"}}]},
        ("scorers", 0, "model"),
    ),
    "HumanPreferenceScorer": ({"scorers": [{"name": "a", "human": {}}]}, ("scorers", 0, "human")),
    "JudgeScorer": (
        {"scorers": [{"name": "a", "judge": {"rubric": "Rate {completion}"}}]},
        ("scorers", 0, "judge"),
    ),
    "RemoteScorer": (
        {"scorers": [{"name": "a", "remote": {"address": "h:1", "evaluator": EVALUATOR}}]},
        ("scorers", 0, "remote"),
    ),
}


def with_field(key: str, value: object) -> tuple[dict[str, Any], str]:
    """(a spec with "<message>.<field>" set to `value`, the field's JSON path)."""
    message, name = key.split(".")
    data, location = copy.deepcopy(BASES[message])
    target: Any = data
    for step in location:
        target = target[step]
    target[name] = value
    path = ""
    for step in (*location, name):
        path = f"{path}[{step}]" if isinstance(step, int) else f"{path}.{step}".lstrip(".")
    return data, path


def errors_of(data: object) -> dict[str, list[str]]:
    """Every error's descriptions by path."""
    found: dict[str, list[str]] = {}
    for e in validate_json(json.dumps(data)).errors:
        found.setdefault(e.field, []).append(e.description)
    return found


def enum_fields(descriptor: Descriptor, seen: set[str]) -> set[str]:
    if descriptor.full_name in seen or descriptor.full_name.startswith("google.protobuf."):
        return set()
    seen.add(descriptor.full_name)
    found = set()
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_ENUM:
            found.add(f"{descriptor.name}.{f.name}")
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            found |= enum_fields(msg_type(f), seen)
    return found


ENUM_FIELDS = sorted(enum_fields(ev.EvaluatorSpec.DESCRIPTOR, set()))


def test_the_enum_fields_are_the_five_expected() -> None:
    """So the parametrised test below cannot silently test nothing."""
    assert ENUM_FIELDS == [
        "CodeScorer.language",
        "ContainsScorer.mode",
        "EvaluatorSpec.aggregation",
        "HumanPreferenceScorer.kind",
        "LengthScorer.unit",
    ]


@pytest.mark.parametrize("key", ENUM_FIELDS)
def test_every_enum_field_refuses_unknown_numbers(key: str) -> None:
    data, path = with_field(key, 99)
    errors = errors_of(data)
    (error,) = errors.pop(path)
    assert error.startswith("unknown value 99; expected one of") and not errors
    data, _ = with_field(key, 1)  # a defined number is fine
    assert validate_json(json.dumps(data)).valid


def test_unknown_enum_numbers_in_a_message_are_refused_too() -> None:
    message = ev.EvaluatorSpec(aggregation=99, scorers=[ev.ScorerSpec(name="a", math={})])  # type: ignore[arg-type]
    assert [e.field for e in validate_spec(message).errors] == ["aggregation"]


def _outside(bound: Bound) -> list[float]:
    below = bound.low if bound.open_low else bound.low - 1
    # 0 would be "unset" for a proto3 number without presence (LengthScorer.max_length).
    return [below if below else -1, bound.high * 2 + 1]


def _json_value(key: str, number: float) -> object:
    return f"{number:g}s" if BOUNDS[key].unit == "s" else number


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_every_number_outside_its_bound_is_refused_with_its_path(key: str) -> None:
    bound = BOUNDS[key]
    for number in _outside(bound):
        data, path = with_field(key, _json_value(key, number))
        why = errors_of(data).get(path, [])
        assert any(e.startswith("must be in") for e in why), (number, errors_of(data))
    data, path = with_field(key, _json_value(key, bound.high))  # the bounds are inclusive
    assert path not in errors_of(data)


@pytest.mark.parametrize("key", [k for k, b in BOUNDS.items() if b.unit != "s"])
def test_not_a_number_is_refused(key: str) -> None:
    """NaN is inside no range (doubles); integer fields refuse it as a string."""
    data, path = with_field(key, "NaN")
    assert path in errors_of(data)


@pytest.mark.parametrize(
    ("scorer", "path"),
    [
        ({"human": {"dataset": "../x"}}, "scorers[0].human.dataset"),
        ({"timeout": "1000000000s", "math": {}}, "scorers[0].timeout"),
        (
            {"model": {"model_revision": "models/rm/revisions/../../etc"}},
            "scorers[0].model.model_revision",
        ),
        (
            {"model": {"model_revision": "models/a..b/revisions/latest"}},
            "scorers[0].model.model_revision",
        ),
        (
            {"judge": {"rubric": "r", "adapter_revision": "models/x/revisions/.."}},
            "scorers[0].judge.adapter_revision",
        ),
        (
            {"remote": {"address": "h:1", "evaluator": "evaluators/../revisions/r1"}},
            "scorers[0].remote.evaluator",
        ),
        ({"code": {"cpu_seconds": 10**12}}, "scorers[0].code.cpu_seconds"),
    ],
)
def test_names_and_values_from_the_review_are_refused(scorer: dict[str, Any], path: str) -> None:
    assert list(errors_of({"scorers": [{"name": "a"} | scorer]})) == [path]


# Sizes --------------------------------------------------------------------------------------------


def schema_spec(schema: object) -> dict[str, Any]:
    return {"scorers": [{"name": "j", "json": {"schema": schema}}]}


def nested(depth: int) -> str:
    """Spec JSON whose schema is {"items": {"items": ...}} `depth` levels deep."""
    schema = '{"items": ' * depth + "{}" + "}" * depth
    return '{"scorers": [{"name": "j", "json": {"schema": ' + schema + "}}]}"


def test_a_spec_over_the_size_limit_is_refused_before_parsing() -> None:
    props = {f"p{i}": {"type": "string"} for i in range(100_000)}
    text = json.dumps(schema_spec({"type": "object", "properties": props}))
    start = time.monotonic()
    result = validate_json(text)
    assert time.monotonic() - start < 1.0  # parsing and checking it took 20-40 s
    assert [e.field for e in result.errors] == ["$"]
    assert f"at most {MAX_SPEC_BYTES // 1024} KiB" in result.errors[0].description
    message = spec({"scorers": [{"name": "a", "judge": {"rubric": "x" * MAX_SPEC_BYTES}}]})
    assert [e.field for e in validate_spec(message).errors] == ["$"]


def test_a_schema_with_too_many_values_is_refused_with_its_path() -> None:
    props = {f"p{i}": {"type": "string"} for i in range(1500)}
    errors = errors_of(schema_spec({"type": "object", "properties": props}))
    assert errors == {
        "scorers[0].json.schema": ["has more than 2000 values (keys' values and list items)"]
    }


@pytest.mark.parametrize("depth", [MAX_OBJECT_DEPTH + 1, 100, 5_000])
def test_a_deeply_nested_schema_is_refused_with_its_path_and_the_limit(depth: int) -> None:
    errors = {e.field: e.description for e in validate_json(nested(depth)).errors}
    assert errors == {"scorers[0].json.schema": f"nested deeper than {MAX_OBJECT_DEPTH} levels"}
    assert validate_json(nested(MAX_OBJECT_DEPTH - 1)).valid


def test_remote_specs_nested_too_deep_are_refused_with_their_path() -> None:
    chain: dict[str, Any] = MATH
    for i in range(40):
        inner = {"address": "h:1", "spec": {"scorers": [chain]}}
        chain = {"name": f"r{i}", "remote": inner}
    errors = errors_of({"scorers": [chain]})
    too_deep = f"nested deeper than {MAX_MESSAGE_DEPTH} messages"
    assert any(too_deep in why for why in errors.values()), errors
    assert all(path.startswith("scorers[0].remote.spec") for path in errors)


# On a real server -------------------------------------------------------------------------------


def big_valid_spec() -> str:
    """Two schemas just under the value limit: ~0.4 s each for the JSON Schema check."""
    props = {f"p{i}": {"type": "string"} for i in range(990)}
    schema = {"type": "object", "properties": props}
    scorers = [{"name": n, "json": {"schema": schema}} for n in ("a", "b")]
    text = json.dumps({"scorers": scorers})
    assert len(text) < MAX_SPEC_BYTES and validate_json(text).valid
    return text


@pytest.mark.slow  # validates big specs for seconds
def test_health_answers_while_big_specs_are_validated(reward_server: ServerThread) -> None:
    too_big = json.dumps(
        schema_spec({"properties": {f"p{i}": {"type": "string"} for i in range(100_000)}})
    )
    requests = [rs.ValidateEvaluatorRequest(spec_json=t) for t in (big_valid_spec(), too_big)]
    with grpc.insecure_channel(reward_server.address) as channel:
        reward = rs_grpc.RewardServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        answers: list[rs.ValidateEvaluatorResponse] = []

        def validate() -> None:
            for request in [requests[0]] * 3 + [requests[1]]:
                answers.append(reward.ValidateEvaluator(request, timeout=60))

        worker = threading.Thread(target=validate)
        worker.start()
        slowest = 0.0
        while worker.is_alive():
            start = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)
        worker.join()
    assert [a.valid for a in answers] == [True, True, True, False]
    assert [e.path for e in answers[3].errors] == ["$"]
    assert slowest < 1.0


def test_big_and_deep_schemas_are_refused_with_their_path(
    reward: rs_grpc.RewardServiceStub,
) -> None:
    """As JSON text a schema can nest 5,000 deep (ValidateEvaluator: invalid, with the path and
    the limit); as a message protobuf stops it near 32 levels, so Score gets a big one."""
    response = reward.ValidateEvaluator(rs.ValidateEvaluatorRequest(spec_json=nested(5_000)))
    assert [(e.path, e.message) for e in response.errors] == [
        ("scorers[0].json.schema", f"nested deeper than {MAX_OBJECT_DEPTH} levels")
    ]
    props = {f"p{i}": {"type": "string"} for i in range(1500)}
    big = spec(schema_spec({"type": "object", "properties": props}))
    request = rs.ScoreRequest(spec=big, samples=[rs.Sample(sample_id="a", completion="{}")])
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scorers[0].json.schema: has more than 2000 values" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"$ref": "http://127.0.0.1:9/s.json"}, "does not resolve inside the schema"),
        ({"$ref": "file:///etc/passwd"}, "does not resolve inside the schema"),
        ({"type": "string", "pattern": "(a)\\1"}, "is not a 'regex'"),
    ],
)
def test_schemas_the_json_scorer_cannot_use_are_refused_at_validation(
    schema: dict[str, object], why: str
) -> None:
    """The spec check is the scorer's own: a schema that validates here scores safely."""
    result = validate_json(json.dumps({"scorers": [{"name": "j", "json": {"schema": schema}}]}))
    assert not result.valid
    assert any(v.field.startswith("scorers[0].json.schema") and why in v.description
               for v in result.errors)  # fmt: skip
