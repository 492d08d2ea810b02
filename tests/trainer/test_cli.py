"""`tlm jobs ...` against the trainer stack, in process through typer's runner."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from services.cli.trainer_cmds import jobs_app
from services.devtools.server_thread import ServerThread
from tests.trainer.conftest import Inputs
from tests.trainer.test_tensorboard import run_metrics_job

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
    assert bad.exit_code == 2 and "FAILED_PRECONDITION" in bad.output


@pytest.mark.slow  # runs an EVALUATE job: generates
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
    assert shown["state"] == "STATE_SUCCEEDED" and "pass_rate" in shown["final_metrics"]
    cancelled = runner.invoke(jobs_app, ["cancel", name, *address])
    assert cancelled.exit_code == 2 and "already ended" in cancelled.output


def test_jobs_create_grpo_with_an_evaluator(stack: ServerThread, inputs: Inputs) -> None:
    args = ["create", "--method", "grpo", "--base-model", "tiny", "--dataset", "prompts"]
    address = ["--address", stack.address]
    out = runner.invoke(
        jobs_app,
        [*args, "--evaluator", "digits", "--num-generations", "4", "--validate-only", *address],
    )
    assert out.exit_code == 0, out.output
    spec = json.loads(out.output)["spec"]
    assert spec["evaluator"] == inputs.evaluator and spec["method"] == "METHOD_GRPO"
    assert spec["grpo"]["num_generations"] == 4 and spec["grpo"]["sampling"]["n"] == 4
    missing = runner.invoke(jobs_app, [*args, *address])
    assert missing.exit_code == 2 and "needs an evaluator" in missing.output


@pytest.fixture(scope="module")
def scripted(
    stack: ServerThread, inputs: Inputs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(trainer address, job name): a finished job that logged `scripted_worker.metrics`."""
    server, name = run_metrics_job(stack, inputs, tmp_path_factory.mktemp("cli-trainer"))
    yield server.address, name
    server.stop()


def test_jobs_plot_writes_a_png_per_metric_and_an_overview(
    scripted: tuple[str, str], tmp_path: Path
) -> None:
    address, name = scripted
    out = runner.invoke(jobs_app, ["plot", name, "--out", str(tmp_path), "--address", address])
    assert out.exit_code == 0, out.output
    paths = [Path(line) for line in out.output.split()]
    names = {"overview", "reward_mean", "reward_std", "kl", "loss", "eval_loss"}
    assert {p.name for p in paths} == {f"{n}.png" for n in names}
    for path in paths:
        assert path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
            assert image.width >= 400 and image.height >= 200
    chosen = runner.invoke(
        jobs_app,
        ["plot", name, "--out", str(tmp_path / "kl"), "--metric", "kl", "--address", address],
    )
    assert chosen.exit_code == 0, chosen.output
    assert [Path(line).name for line in chosen.output.split()] == ["overview.png", "kl.png"]


def test_jobs_plot_errors_are_clear_and_never_a_traceback(
    scripted: tuple[str, str], inputs: Inputs, tmp_path: Path
) -> None:
    address, name = scripted
    cases = [
        (["plot", "jobs/no-such-job", "--address", address], "NOT_FOUND", 2),
        (["plot", name, "--metric", "reward", "--address", address], "no metric reward; the", 2),
        (["plot", name, "--address", "127.0.0.1:1"], "cannot reach the trainer service at", 2),
    ]
    for args, message, code in cases:
        out = runner.invoke(jobs_app, [*args, "--out", str(tmp_path)])
        text = " ".join(out.output.split())
        assert out.exit_code == code and message in text, out.output
        assert "Traceback" not in text and isinstance(out.exception, SystemExit)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # reads a running job's events for seconds
def test_jobs_plot_of_a_running_job_plots_what_it_has(
    stack: ServerThread, inputs: Inputs, scripted: tuple[str, str], tmp_path: Path
) -> None:
    """A job still running (the scripted worker sleeps) is read for a few seconds, not
    followed to its end: here it has no metrics yet, which is said plainly."""
    address, _ = scripted
    create = ["create", "--method", "sft", "--base-model", "tiny", "--dataset", "sft"]
    created = runner.invoke(
        jobs_app, [*create, "--output-model", "models/sleep", "--address", address]
    )
    assert created.exit_code == 0, created.output
    name = created.output.split()[0]
    started = time.monotonic()
    out = runner.invoke(jobs_app, ["plot", name, "--out", str(tmp_path), "--address", address])
    assert out.exit_code == 2 and "has no step metrics yet" in out.output, out.output
    assert time.monotonic() - started < 20
    runner.invoke(jobs_app, ["cancel", name, "--address", address])


def test_jobs_watch_shows_reward_kl_and_loss(scripted: tuple[str, str]) -> None:
    """The last step's values stay on the line after an eval-only metrics event."""
    address, name = scripted
    out = runner.invoke(jobs_app, ["watch", name, "--address", address])
    assert out.exit_code == 0, out.output
    assert "reward=1 KL=0.04 loss=0.25" in out.output and "SUCCEEDED" in out.output


def test_jobs_create_grpo_flags_and_spec_file(
    stack: ServerThread, inputs: Inputs, tmp_path: Path
) -> None:
    """--spec gives everything, flags override it; the service fills the rest."""
    spec_file = tmp_path / "grpo.yaml"
    spec_file.write_text(
        "method: GRPO\nbase_model: tiny\ntrain_dataset: prompts\nevaluator: digits\n"
        "tuning: {full: {}}\ngrpo: {beta: 0.1, loss_type: dapo, sampling: {seed: 5}}\n"
    )
    flags = ["--beta", "0.02", "--epsilon", "0.3", "--scale-rewards", "none", "--temperature", "1"]
    flags += ["--num-iterations", "2", "--sync-every", "3", "--log-every", "1"]
    flags += ["--num-generations", "4", "--max-tokens", "12", "--max-policy-lag", "1"]
    out = runner.invoke(
        jobs_app,
        ["create", "--spec", str(spec_file), *flags, "--validate-only", "--address", stack.address],
    )
    assert out.exit_code == 0, out.output
    spec = json.loads(out.output)["spec"]
    grpo = spec["grpo"]
    assert spec["evaluator"] == inputs.evaluator and spec["base_model"] == inputs.base
    assert "full" in spec["tuning"] and spec["training"]["log_every"] == 1
    assert (grpo["beta"], grpo["epsilon"], grpo["loss_type"]) == (0.02, 0.3, "dapo")
    assert (grpo["scale_rewards"], grpo["num_iterations"], grpo["sync_every"]) == ("none", 2, 3)
    assert grpo["max_policy_lag"] == 1
    sampling = grpo["sampling"]
    assert (sampling["n"], sampling["max_tokens"], sampling["seed"]) == (4, 12, "5")
    assert sampling["temperature"] == 1
