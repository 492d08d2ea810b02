"""`tlm jobs create`'s spec: flags -> TrainingJobSpec fields, a spec file (JSON or YAML) under
the flags, and clear errors naming the file, field or flag. Pure: no server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from typer.testing import CliRunner

from services.cli.job_spec import SpecError, build_spec, read_spec_file
from services.cli.trainer_cmds import jobs_app
from tlm.trainer.v1 import trainer_pb2 as pb

GRPO_FLAGS: dict[str, Any] = {
    "base_model": "tiny",
    "dataset": "math@r2",
    "evaluator": "grader@prod",
    "beta": 0.0,
    "epsilon": 0.28,
    "loss_type": "dapo",
    "scale_rewards": "batch",
    "temperature": 0.7,
    "num_iterations": 2,
    "sync_every": 4,
    "log_every": 1,
    "num_generations": 16,
    "max_tokens": 128,
}


def as_dict(spec: pb.TrainingJobSpec) -> dict[str, Any]:
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def test_every_grpo_flag_lands_on_its_field() -> None:
    """beta 0 is set (an explicit zero is not 'unset'), names get their collection and
    `latest` when no revision is given, sampling flags go to grpo.sampling."""
    spec = build_spec(None, "grpo", GRPO_FLAGS)
    assert as_dict(spec) == {
        "method": "METHOD_GRPO",
        "base_model": "models/tiny/revisions/latest",
        "train_dataset": "datasets/math/revisions/r2",
        "evaluator": "evaluators/grader/revisions/prod",
        "training": {"log_every": 1},
        "grpo": {
            "beta": 0.0,
            "epsilon": 0.28,
            "loss_type": "dapo",
            "scale_rewards": "batch",
            "num_iterations": 2,
            "sync_every": 4,
            "num_generations": 16,
            "sampling": {"temperature": 0.7, "max_tokens": 128},
        },
    }
    assert spec.grpo.HasField("beta")


def test_training_and_tuning_flags() -> None:
    flags = {"base_model": "tiny", "dataset": "d", "batch_size": 4, "max_steps": 9}
    spec = build_spec(None, "sft", flags | {"lora_r": 8, "learning_rate": 1e-4})
    assert spec.tuning.lora.r == 8 and spec.training.per_device_batch_size == 4
    assert spec.training.max_steps == 9 and spec.training.learning_rate == pytest.approx(1e-4)
    assert build_spec(None, "sft", flags | {"lora": False}).tuning.WhichOneof("mode") == "full"
    assert not build_spec(None, "sft", flags).HasField("tuning")  # the service's default


def test_method_flags_follow_the_method() -> None:
    """--beta is dpo.beta for DPO; a setting the method lacks is refused, naming the flag;
    EVALUATE's --dataset is its eval_dataset and its sampling takes --max-tokens."""
    base = {"base_model": "tiny", "dataset": "prefs"}
    assert build_spec(None, "dpo", base | {"beta": 0.3}).dpo.beta == pytest.approx(0.3)
    with pytest.raises(SpecError, match="--epsilon: dpo jobs have no such setting"):
        build_spec(None, "dpo", base | {"epsilon": 0.1})
    with pytest.raises(SpecError, match="--temperature: sft jobs have no such setting"):
        build_spec(None, "sft", base | {"temperature": 0.5})
    evaluate = build_spec(None, "evaluate", base | {"max_tokens": 8})
    assert evaluate.eval_dataset == "datasets/prefs/revisions/latest"
    assert not evaluate.train_dataset and evaluate.evaluate.sampling.max_tokens == 8


def test_missing_or_unknown_method_and_inputs_are_errors() -> None:
    with pytest.raises(SpecError, match="--method is needed"):
        build_spec(None, None, {"base_model": "tiny", "dataset": "d"})
    with pytest.raises(SpecError, match="unknown method 'ppo2'"):
        build_spec(None, "ppo2", {})
    with pytest.raises(SpecError, match="--dataset is needed"):
        build_spec(None, "sft", {"base_model": "tiny"})
    with pytest.raises(SpecError, match="--lora-r needs LoRA"):
        build_spec(None, "sft", {"base_model": "t", "dataset": "d", "lora": False, "lora_r": 4})


def test_spec_file_json_and_yaml_with_flags_on_top(tmp_path: Path) -> None:
    """The file gives everything; flags override what they name and leave the rest."""
    body = {
        "method": "GRPO",
        "base_model": "models/tiny/revisions/r1",
        "train_dataset": "math",
        "tuning": {"full": {}},
        "training": {"max_steps": 30, "learningRate": 0.01},  # camelCase is proto JSON too
        "grpo": {"beta": 0.1, "importance_sampling_cap": 2, "sampling": {"seed": 3}},
    }
    json_file = tmp_path / "spec.json"
    json_file.write_text(json.dumps(body))
    yaml_file = tmp_path / "spec.yaml"
    yaml_file.write_text(
        "method: GRPO\nbase_model: models/tiny/revisions/r1\ntrain_dataset: math\n"
        "tuning: {full: {}}\ntraining: {max_steps: 30, learningRate: 0.01}\n"
        "grpo:\n  beta: 0.1\n  importance_sampling_cap: 2\n  sampling: {seed: 3}\n"
    )
    for path in (json_file, yaml_file):
        file_spec = read_spec_file(path)
        spec = build_spec(file_spec, None, {"beta": 0.02, "max_tokens": 16, "dataset": "other"})
        assert spec.grpo.beta == pytest.approx(0.02) and spec.grpo.importance_sampling_cap == 2
        assert spec.grpo.sampling.seed == 3 and spec.grpo.sampling.max_tokens == 16
        assert spec.training.max_steps == 30 and spec.tuning.WhichOneof("mode") == "full"
        assert spec.train_dataset == "datasets/other/revisions/latest"
        assert spec.base_model == "models/tiny/revisions/r1"
    assert build_spec(read_spec_file(json_file), None, {}).train_dataset == (
        "datasets/math/revisions/latest"
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.json", '{"grpo": {"bta": 1}}', "a.json: grpo.bta: unknown field; GrpoParams has"),
        ("b.json", '{"grpo": {"beta": "x"}}', "b.json: Couldn't parse float: x at grpo.beta"),
        ("c.json", '{"method": "NOPE"}', "c.json: Failed to parse method field"),
        ("d.json", '{"training": {"max_steps": 1.5', "d.json: not valid JSON"),
        ("e.yaml", "grpo: [1, 2", "e.yaml: not valid YAML"),
        ("f.json", "[1, 2]", "f.json: expected an object (a TrainingJobSpec), got list"),
    ],
)
def test_bad_spec_files_name_the_file_and_field(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        read_spec_file(path)
    assert str(err.value).startswith(f"{path.parent}/") and message in str(err.value)


def test_cli_prints_spec_errors_without_a_traceback(tmp_path: Path) -> None:
    """No server is needed: the spec is refused before any RPC, exit code 2."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"grpo": {"sampling": {"temprature": 1}}}')
    runner = CliRunner()
    cases = [
        (["--spec", str(bad)], "bad.json: grpo.sampling.temprature: unknown field"),
        (["--spec", str(tmp_path / "missing.json")], "missing.json: cannot read it: No such file"),
        (["--method", "sft", "--base-model", "tiny"], "--dataset is needed"),
    ]
    for args, message in cases:
        out = runner.invoke(jobs_app, ["create", *args, "--address", "127.0.0.1:1"])
        text = " ".join(out.output.split())  # rich wraps long lines
        assert out.exit_code == 2 and "Traceback" not in text, out.output
        assert text.startswith("error: ") and message in text, out.output
