"""Evaluator specs stored as revisions and returned as their JSON."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.registry.conftest import A, B, Registry, details, unique
from tlm.registry.v1 import registry_pb2 as pb
from tlm.reward.v1 import evaluator_pb2

SPEC = {
    "scorers": [
        {"name": "format", "weight": 0.2, "format": {"tags": ["think", "answer"]}},
        {"name": "correct", "math": {"reference_field": "reference"}},
    ],
    "gates": [{"scorer": "format", "reward": -1.0}],
}


def test_store_and_read_back_as_json(registry: Registry) -> None:
    parent = f"evaluators/{unique('ev')}"
    rev = registry.stub.CreateEvaluatorRevision(
        pb.CreateEvaluatorRevisionRequest(
            parent=parent, spec_json=json.dumps(SPEC), request_id="x"
        ),
        metadata=A,
    )
    assert rev.revision_id == "r1"
    assert [s.name for s in rev.spec.scorers] == ["format", "correct"]
    # Stored normalised: the reward service's defaults are filled in.
    assert json.loads(rev.spec_json)["gates"] == [
        {"scorer": "format", "min_value": 1.0, "reward": -1.0, "on_unscorable": True}
    ]
    again = registry.stub.CreateEvaluatorRevision(
        pb.CreateEvaluatorRevisionRequest(
            parent=parent, spec_json=json.dumps(SPEC), request_id="x"
        ),
        metadata=A,
    )
    assert again.name == rev.name
    from_message = registry.stub.CreateEvaluatorRevision(
        pb.CreateEvaluatorRevisionRequest(
            parent=parent,
            spec=evaluator_pb2.EvaluatorSpec(
                description="v2",
                scorers=[evaluator_pb2.ScorerSpec(name="has-answer", regex={"pattern": "answer"})],
            ),
        ),
        metadata=A,
    )
    assert from_message.revision_id == "r2"
    latest = registry.stub.GetEvaluatorRevision(
        pb.GetEvaluatorRevisionRequest(name=f"{parent}/revisions/latest"), metadata=A
    )
    assert latest.spec.description == "v2"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetEvaluatorRevision(
            pb.GetEvaluatorRevisionRequest(name=rev.name), metadata=B
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "spec_json",
    [
        '{"scorers": [{"name": "x", "nope": {}}]}',
        "not json",
        '{"scorers": 3}',
        '{"scorers": [{"name": "r", "regex": {"pattern": "(a)\\\\1"}}]}',
    ],
)
def test_invalid_specs_are_refused(registry: Registry, spec_json: str) -> None:
    parent = f"evaluators/{unique('bad')}"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateEvaluatorRevision(
            pb.CreateEvaluatorRevisionRequest(parent=parent, spec_json=spec_json), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[1]
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetEvaluator(pb.GetEvaluatorRequest(name=parent), metadata=A)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


DEEP_SCHEMA = '{"items": ' * 5000 + "{}" + "}" * 5000


@pytest.mark.parametrize(
    ("spec_json", "path"),
    [
        ('{"aggregation": 99, "scorers": [{"name": "a", "math": {}}]}', "aggregation"),
        ('{"scorers": [{"name": "h", "human": {"dataset": "../x"}}]}', "scorers[0].human.dataset"),
        (
            '{"scorers": [{"name": "t", "timeout": "1000000000s", "math": {}}]}',
            "scorers[0].timeout",
        ),
        (
            '{"scorers": [{"name": "m", "model": {"model_revision": "models/a..b/revisions/r1"}}]}',
            "scorers[0].model.model_revision",
        ),
        (
            '{"scorers": [{"name": "j", "json": {"schema": ' + DEEP_SCHEMA + "}}]}",
            "scorers[0].json.schema",
        ),
    ],
    ids=["enum", "dataset", "timeout", "model-revision", "deep-schema"],
)
def test_specs_out_of_bounds_are_refused_with_their_path(
    registry: Registry, spec_json: str, path: str
) -> None:
    """The registry runs the reward service's validation when it stores a revision."""
    parent = f"evaluators/{unique('bounds')}"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateEvaluatorRevision(
            pb.CreateEvaluatorRevisionRequest(parent=parent, spec_json=spec_json), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in details(err.value)[1]] == [path]
