"""Evaluator specs written before the enum values were prefixed (v1.0: `"unit": "WORDS"`) keep
working: sent as JSON, and stored as registry bodies; what the registry returns uses the new
names (`LENGTH_UNIT_WORDS`)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.registry.conftest import A, Registry, unique
from tlm.registry.v1 import registry_pb2 as pb
from tlm.reward.v1 import evaluator_pb2 as ev

LEGACY_SPEC = {
    "scorers": [
        {"name": "short", "length": {"max_length": 40, "unit": "WORDS"}},
        {"name": "has", "contains": {"substrings": ["a"], "mode": "ANY"}},
    ],
    "aggregation": "WEIGHTED_MEAN",
}


def test_a_v1_0_spec_is_accepted_and_stored_with_the_new_names(registry: Registry) -> None:
    request = pb.CreateEvaluatorRevisionRequest(
        parent=f"evaluators/{unique('legacy')}", spec_json=json.dumps(LEGACY_SPEC)
    )
    revision = registry.stub.CreateEvaluatorRevision(request, metadata=A)
    assert revision.spec.aggregation == ev.AGGREGATION_WEIGHTED_MEAN
    assert revision.spec.scorers[0].length.unit == ev.LENGTH_UNIT_WORDS
    stored = json.loads(revision.spec_json)
    assert stored["aggregation"] == "AGGREGATION_WEIGHTED_MEAN"
    assert stored["scorers"][1]["contains"]["mode"] == "MATCH_MODE_ANY"


def test_a_revision_stored_with_v1_0_names_still_reads(registry: Registry) -> None:
    if registry.backend != "sqlite":
        pytest.skip("writes the stored body through the SQLite file")
    spec = json.dumps({**LEGACY_SPEC, "aggregation": "AGGREGATION_MIN"})
    created = registry.stub.CreateEvaluatorRevision(
        pb.CreateEvaluatorRevisionRequest(parent=f"evaluators/{unique('old')}", spec_json=spec),
        metadata=A,
    )
    # Rewrite the stored body as v1.0 wrote it: every enum value without its prefix.
    with sqlite3.connect(registry.data_dir / "registry.db") as db:
        pk, body = db.execute("SELECT pk, body FROM revisions ORDER BY pk DESC").fetchone()
        assert "AGGREGATION_MIN" in body  # the revision just created
        old = body
        for new_name, legacy in [
            ("AGGREGATION_MIN", "MIN"),
            ("LENGTH_UNIT_WORDS", "WORDS"),
            ("MATCH_MODE_ANY", "ANY"),
        ]:
            old = old.replace(new_name, legacy)
        assert '"MIN"' in old and "AGGREGATION_" not in old
        db.execute("UPDATE revisions SET body = ? WHERE pk = ?", (old, pk))
    got = registry.stub.GetEvaluatorRevision(
        pb.GetEvaluatorRevisionRequest(name=created.name), metadata=A
    )
    assert got.spec.aggregation == ev.AGGREGATION_MIN
    assert got.spec.scorers[0].length.unit == ev.LENGTH_UNIT_WORDS
    assert got.spec_json == created.spec_json  # written again with today's names
