"""The reward CLI commands against a real reward server."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from services.cli.reward_cmds import TEMPLATES, evaluators_app, score
from services.devtools.server_thread import ServerThread
from services.specs.evaluator import validate_json

runner = CliRunner()


def test_every_template_is_a_valid_evaluator() -> None:
    for name in TEMPLATES:
        result = runner.invoke(evaluators_app, ["init", "--template", name])
        assert result.exit_code == 0, result.output
        assert validate_json(result.output).valid, name


def test_validate_reports_paths(reward_server: ServerThread, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scorers": [{"name": "x", "regex": {"pattern": "(?=a)"}}]}))
    result = runner.invoke(
        evaluators_app, ["validate", str(bad), "--address", reward_server.address]
    )
    assert result.exit_code == 1
    good = tmp_path / "good.json"
    good.write_text(json.dumps(TEMPLATES["math"]))
    result = runner.invoke(
        evaluators_app, ["validate", str(good), "--address", reward_server.address]
    )
    assert result.exit_code == 0 and "valid" in result.output


def test_score_prints_rewards(reward_server: ServerThread, tmp_path: Path) -> None:
    spec = tmp_path / "math.json"
    spec.write_text(json.dumps(TEMPLATES["math"]))
    rows = tmp_path / "in.jsonl"
    good = {
        "sample_id": "good",
        "prompt": "1+1?",
        "completion": "<think>x</think><answer>2</answer>",
    }
    good["metadata"] = {"reference": "2"}
    unscorable = {**good, "sample_id": "no-ref", "metadata": {}}
    lines = [good, {"completion": "2"}, unscorable]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    app = typer.Typer()
    app.command()(score)
    args = ["--evaluator", str(spec), "--input", str(rows), "--address", reward_server.address]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "good" in result.output and "1.2" in result.output and "-1" in result.output
    # An UNSCORABLE sample has no reward: a dash, not 0.
    no_ref = next(line for line in result.output.splitlines() if "no-ref" in line)
    assert "UNSCORABLE" in no_ref and "—" in no_ref and " 0 " not in no_ref
