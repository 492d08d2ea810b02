"""services/common/proto_json.py: v1.0's unprefixed enum names still load, new names go out,
and people read and type short names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from services.cli.job_spec import read_spec_file
from services.common import proto_json
from services.specs.evaluator import validate_json
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.trainer.v1 import trainer_pb2 as pb


def test_legacy_names_load_wherever_an_enum_sits() -> None:
    """Top level, nested messages, repeated messages, and specs inside specs (remote)."""
    spec = proto_json.parse_dict(
        {
            "aggregation": "MAX",
            "scorers": [
                {"name": "n", "length": {"max_length": 5, "unit": "TOKENS"}},
                {"name": "r", "remote": {"address": "x:1", "spec": {"aggregation": "MIN"}}},
            ],
        },
        ev.EvaluatorSpec(),
    )
    assert spec.aggregation == ev.AGGREGATION_MAX
    assert spec.scorers[0].length.unit == ev.LENGTH_UNIT_TOKENS
    assert spec.scorers[1].remote.spec.aggregation == ev.AGGREGATION_MIN
    out = json_format.MessageToDict(spec)
    assert out["aggregation"] == "AGGREGATION_MAX"  # what goes out is the new name


def test_what_is_no_enum_name_is_left_to_the_parser() -> None:
    with pytest.raises(json_format.ParseError, match="MEDIAN"):
        proto_json.parse_dict({"aggregation": "MEDIAN"}, ev.EvaluatorSpec())
    with pytest.raises(json_format.ParseError):  # lower case only where people type
        proto_json.parse_dict({"aggregation": "min"}, ev.EvaluatorSpec())
    assert proto_json.parse_dict({"aggregation": "min"}, ev.EvaluatorSpec(), any_case=True)
    assert proto_json.upgrade_enums([1, 2], ev.EvaluatorSpec.DESCRIPTOR) == [1, 2]
    assert proto_json.upgrade_enums({"scorers": "x"}, ev.EvaluatorSpec.DESCRIPTOR) == {
        "scorers": "x"
    }


def test_short_names_for_tables_and_flags() -> None:
    state = pb.TrainingJob.State
    assert proto_json.short_name(state, pb.TrainingJob.STATE_RUNNING) == "RUNNING"
    assert proto_json.enum_number(state, "running") == pb.TrainingJob.STATE_RUNNING
    assert proto_json.enum_number(pb.Method, "reward_model") == pb.METHOD_REWARD_MODEL
    with pytest.raises(ValueError, match="expected one of sft, dpo, kto"):
        proto_json.enum_number(pb.Method, "ppo2")
    with pytest.raises(ValueError):
        proto_json.enum_number(pb.Method, "unspecified")  # the zero value is never a choice
    # ErrorReason values are ErrorInfo.reason strings: unprefixed, and shown as they are.
    reason = common_pb2.ErrorReason
    assert proto_json.short_name(reason, common_pb2.RESOURCE_NOT_FOUND) == "RESOURCE_NOT_FOUND"


def test_a_v1_0_job_spec_file_loads(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"method": "GRPO", "resources": {"auto": {}}}))
    typed = tmp_path / "typed.yaml"
    typed.write_text("method: grpo\n")
    assert read_spec_file(old).method == read_spec_file(typed).method == pb.METHOD_GRPO
    shown = json_format.MessageToDict(read_spec_file(old))
    assert shown["method"] == "METHOD_GRPO"


def test_a_v1_0_evaluator_spec_validates_and_normalises_to_the_new_names() -> None:
    result = validate_json(
        json.dumps({"scorers": [{"name": "l", "length": {"max_length": 9, "unit": "WORDS"}}]})
    )
    assert result.valid, result.errors
    data = json.loads(result.normalized_json)
    assert data["scorers"][0]["length"]["unit"] == "LENGTH_UNIT_WORDS"
    assert data["aggregation"] == "AGGREGATION_WEIGHTED_SUM"


def test_enum_flags_take_short_names_and_say_which() -> None:
    from typer.testing import CliRunner

    from services.cli.trainer_cmds import jobs_app

    out = CliRunner().invoke(jobs_app, ["list", "--state", "bogus", "--address", "127.0.0.1:1"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines()[-1] == (
        "error: --state: expected one of pending, running, succeeded, failed, cancelling, "
        "cancelled, got 'bogus'"
    )
