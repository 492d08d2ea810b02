"""`tlm jobs ...` against the trainer stack, in process through typer's runner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from services.cli.trainer_cmds import jobs_app
from services.devtools.server_thread import ServerThread
from tests.trainer.conftest import Inputs

runner = CliRunner()


def test_jobs_create_validate_only_shows_defaults(stack: ServerThread, inputs: Inputs) -> None:
    args = ["create", "--method", "sft", "--base-model", "tiny", "--dataset", "sft"]
    out = runner.invoke(
        jobs_app, [*args, "--validate-only", "--max-steps", "5", "--address", stack.address]
    )
    assert out.exit_code == 0, out.output
    spec = json.loads(out.output)["spec"]
    assert spec["base_model"] == inputs.base and spec["training"]["max_steps"] == 5
    bad = runner.invoke(
        jobs_app,
        [
            "create",
            "--method",
            "dpo",
            "--base-model",
            "tiny",
            "--dataset",
            "sft",
            "--address",
            stack.address,
        ],
    )
    assert bad.exit_code == 1 and "FAILED_PRECONDITION" in bad.output


def test_jobs_create_watch_list_show_cancel(stack: ServerThread, inputs: Inputs) -> None:
    address = ["--address", stack.address]
    args = ["create", "--method", "evaluate", "--base-model", "tiny", "--dataset", "prompts"]
    out = runner.invoke(jobs_app, [*args, "--evaluator", "digits", "--watch", *address])
    assert out.exit_code == 0, out.output
    assert "SUCCEEDED" in out.output and "reward_mean" in out.output
    name = out.output.split()[0]
    listed = runner.invoke(jobs_app, ["list", "--method", "evaluate", *address])
    assert name in listed.output
    shown = json.loads(runner.invoke(jobs_app, ["show", name, *address]).output)
    assert shown["state"] == "SUCCEEDED" and "pass_rate" in shown["final_metrics"]
    cancelled = runner.invoke(jobs_app, ["cancel", name, *address])
    assert cancelled.exit_code == 1 and "already ended" in cancelled.output


def test_jobs_create_grpo_with_an_evaluator(stack: ServerThread, inputs: Inputs) -> None:
    args = ["create", "--method", "grpo", "--base-model", "tiny", "--dataset", "prompts"]
    address = ["--address", stack.address]
    out = runner.invoke(
        jobs_app,
        [*args, "--evaluator", "digits", "--num-generations", "4", "--validate-only", *address],
    )
    assert out.exit_code == 0, out.output
    spec = json.loads(out.output)["spec"]
    assert spec["evaluator"] == inputs.evaluator and spec["method"] == "GRPO"
    assert spec["grpo"]["num_generations"] == 4 and spec["grpo"]["sampling"]["n"] == 4
    missing = runner.invoke(jobs_app, [*args, *address])
    assert missing.exit_code == 1 and "needs an evaluator" in missing.output
