"""The method table: every method has one entry, every path it names is a proto field, each
consumer reads it, and a field that a method does not use is refused naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor

from services.common.errors import InvalidArgument
from services.trainer import convert, core, resources, spec, worker
from services.trainer.domain import Method
from services.trainer.methods import ALL_PATHS, METHODS, Reference
from services.trainer.params import (
    DpoParams,
    EvaluateParams,
    GrpoParams,
    LoraParams,
    Sampling,
    TrainingParams,
)
from services.trainer.spec import DevicePlan, JobSpec, validate
from tlm.trainer.v1 import trainer_pb2 as pb

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
EVALUATOR = "evaluators/e/revisions/r1"


def test_every_method_has_one_entry_naming_its_own_params_field() -> None:
    assert set(METHODS) == set(Method)
    oneof = {f.name for f in pb.TrainingJobSpec.DESCRIPTOR.oneofs_by_name["method_params"].fields}
    assert {d.params_field for d in METHODS.values()} == oneof
    for method, d in METHODS.items():
        assert d.method is method
        assert dataclasses.is_dataclass(d.params) and d.params.__dataclass_params__.frozen


def _proto_field(descriptor: Descriptor, path: str) -> bool:
    head, _, rest = path.partition(".")
    field = descriptor.fields_by_name.get(head)
    if field is None:
        return False
    return not rest or (field.message_type is not None and _proto_field(field.message_type, rest))


def test_every_path_a_method_reads_is_a_field_of_the_contract() -> None:
    assert [
        p for p in sorted(ALL_PATHS) if not _proto_field(pb.TrainingJobSpec.DESCRIPTOR, p)
    ] == []
    for d in METHODS.values():
        assert d.reads <= ALL_PATHS, d.name
        assert {c.path for c in d.conditions} <= d.reads, d.name


def test_the_worker_and_conversion_read_the_table() -> None:
    assert {m: d.runner for m, d in METHODS.items() if d.runner} == worker.RUNNERS
    assert worker.RUNNERS[Method.PPO] == "services.trainer.ppo"
    for method, d in METHODS.items():
        data = validate(_minimal(method)).to_dict() if d.implemented else None
        if data is not None:
            assert convert.spec_to_proto(data).WhichOneof("method_params") == d.params_field


def test_validation_and_the_estimate_change_when_the_table_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sft = validate(JobSpec(Method.SFT, BASE, DATA, training=TrainingParams(seed=7)))
    devices = resources.Devices(0, 0, 10**12)
    assert resources.estimate(sft, 1000, {}, devices).breakdown["reference_model"] == 0
    changed = dataclasses.replace(
        METHODS[Method.SFT],
        reads=METHODS[Method.SFT].reads - {"training.seed"},
        reference=Reference.WEIGHTS,
        learning_rate=(3e-5, 3e-4),
    )
    monkeypatch.setitem(METHODS, Method.SFT, changed)
    with pytest.raises(InvalidArgument) as err:
        validate(JobSpec(Method.SFT, BASE, DATA, training=TrainingParams(seed=7)))
    assert [v.field for v in err.value.violations] == ["spec.training.seed"]
    assert validate(JobSpec(Method.SFT, BASE, DATA)).training.learning_rate == 3e-4
    full = dataclasses.replace(sft, lora=None)
    assert resources.estimate(full, 1000, {}, devices).breakdown["reference_model"] == 4000
    assert spec.METHODS is core.METHODS is resources.METHODS is convert.METHODS is METHODS


async def test_creation_reads_what_is_implemented_and_who_needs_an_evaluator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.common.errors import FailedPrecondition
    from services.trainer.core import Changes, TrainerCore
    from services.trainer.store import JobStore
    from services.trainer.supervisor import Supervisor, WorkerConfig

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    changes = Changes()
    supervisor = Supervisor(store, WorkerConfig(root=tmp_path, max_running=0), changes.notify)
    trainer = TrainerCore(store, supervisor, changes, resources.Devices(0, 0, 10**9))
    unready = dataclasses.replace(METHODS[Method.SFT], runner="")
    monkeypatch.setitem(METHODS, Method.SFT, unready)
    with pytest.raises(FailedPrecondition, match="SFT is not implemented yet"):
        await trainer.check("a", JobSpec(Method.SFT, BASE, DATA))
    store.close()


def _minimal(method: Method) -> JobSpec:
    if method is Method.EVALUATE:
        return JobSpec(method, BASE, "", eval_dataset=DATA, evaluator=EVALUATOR)
    evaluator = EVALUATOR if METHODS[method].evaluator else ""
    return JobSpec(method, BASE, DATA, evaluator=evaluator)


@pytest.mark.parametrize("method", [m for m in Method if METHODS[m].implemented])
def test_a_minimal_spec_and_its_filled_in_form_are_accepted(method: Method) -> None:
    filled = validate(_minimal(method))
    # The filled-in spec (what validate_only and GetTrainingJob show) can be sent again.
    assert validate(JobSpec.from_dict(filled.to_dict())) == filled


def _refused(job: JobSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as err:
        validate(job)
    return {v.field: v.description for v in err.value.violations}


BASIC = {"method": Method.SFT, "base_model": BASE, "train_dataset": DATA}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"evaluator": EVALUATOR}, "spec.evaluator"),
        ({"training": TrainingParams(eval_every=5)}, "spec.training.eval_every"),
        ({"training": TrainingParams(epochs=2, max_steps=10)}, "spec.training.epochs"),
        (
            {"method": Method.DPO, "params": DpoParams(label_smoothing=0.1)},
            "spec.dpo.label_smoothing",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "training": TrainingParams(max_length=64),
            },
            "spec.training.max_length",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "params": GrpoParams(num_generations=4, sampling=Sampling(n=2)),
            },
            "spec.grpo.sampling.n",
        ),
        (
            {"method": Method.GRPO, "evaluator": EVALUATOR, "lora": LoraParams(dropout=0.1)},
            "spec.tuning.lora.dropout",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "params": GrpoParams(
                    importance_sampling_correction=False, importance_sampling_cap=2
                ),
            },
            "spec.grpo.importance_sampling_cap",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "params": GrpoParams(beta=0, use_bias_correction_kl=False),
            },
            "spec.grpo.use_bias_correction_kl",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "params": GrpoParams(sampling=Sampling(skip_logprobs=True)),
            },
            "spec.grpo.sampling.skip_logprobs",
        ),
        (
            {
                "method": Method.GRPO,
                "evaluator": EVALUATOR,
                "resources": DevicePlan(gradient_checkpointing=True),
                "explicit_resources": True,
            },
            "spec.resources.explicit.gradient_checkpointing",
        ),
    ],
)
def test_a_field_the_method_does_not_use_is_refused_by_name(
    changes: dict[str, Any], field: str
) -> None:
    problems = _refused(JobSpec(**(BASIC | changes)))
    assert list(problems) == [field]


def test_evaluate_refuses_every_training_field() -> None:
    job = JobSpec(
        Method.EVALUATE,
        BASE,
        DATA,
        lora=None,
        eval_dataset=DATA,
        evaluator=EVALUATOR,
        output_model="models/x",
        training=TrainingParams(learning_rate=1e-3, max_steps=3, max_length=32, save_every=0),
        resources=DevicePlan(device_type="cpu"),
        explicit_resources=True,
    )
    assert set(_refused(job)) == {
        "spec.train_dataset",  # EVALUATE reads eval_dataset when both are set
        "spec.tuning.full",
        "spec.output_model",
        "spec.training.learning_rate",
        "spec.training.max_steps",
        "spec.training.max_length",
        "spec.training.save_every",
        "spec.resources.explicit",
        "spec.resources.explicit.device_type",
    }
    assert _refused(
        dataclasses.replace(
            job,
            output_model="",
            lora=LoraParams(r=8),
            training=TrainingParams(),
            explicit_resources=False,
            resources=DevicePlan(),
            train_dataset="",
        )
    ) == {"spec.tuning.lora.r": "EVALUATE does not use it; leave it unset"}


def test_the_fields_a_method_uses_are_accepted() -> None:
    dpo = JobSpec(Method.DPO, BASE, DATA, params=DpoParams(loss_type="robust", label_smoothing=0.1))
    assert validate(dpo).params.label_smoothing == 0.1
    sft = JobSpec(
        Method.SFT, BASE, DATA, eval_dataset=DATA, training=TrainingParams(eval_every=5, epochs=2)
    )
    validate(sft)
    grpo = validate(
        JobSpec(
            Method.GRPO,
            BASE,
            DATA,
            evaluator=EVALUATOR,
            eval_dataset=DATA,
            training=TrainingParams(gradient_accumulation_steps=2, save_every=3, eval_every=2),
            params=GrpoParams(num_generations=4, sampling=Sampling(n=4, max_tokens=8)),
        )
    )
    assert grpo.lora is not None and grpo.lora.dropout == 0.0  # GRPO trains with dropout off
    evaluation = validate(
        JobSpec(
            Method.EVALUATE,
            BASE,
            "",
            eval_dataset=DATA,
            evaluator=EVALUATOR,
            params=EvaluateParams(sampling=Sampling(skip_logprobs=True, n=2)),
        )
    )
    assert evaluation.training.learning_rate is None and evaluation.output_model == ""


def test_robust_dpo_label_smoothing_changes_trl_s_loss(tiny_model_dir: Path) -> None:
    """TRL 1.16 reads label_smoothing in loss_type "robust" and ignores it in "sigmoid" (the
    reason the spec refuses it there): its own loss on the same batch shows both."""
    losses = {
        (loss, smoothing): _trl_dpo_loss(tiny_model_dir, loss, smoothing)
        for loss in ("sigmoid", "robust")
        for smoothing in (0.0, 0.2)
    }
    assert losses["robust", 0.0] == pytest.approx(losses["sigmoid", 0.0])  # rDPO at 0 is DPO
    assert losses["robust", 0.2] != pytest.approx(losses["robust", 0.0], abs=1e-4)
    assert losses["sigmoid", 0.2] == pytest.approx(losses["sigmoid", 0.0])


def _trl_dpo_loss(model_dir: Path, loss_type: str, label_smoothing: float) -> float:
    """TRL's DPOTrainer.compute_loss on one fixed batch, built the way trl_methods builds it
    (services.trainer.trl_methods.RECIPES[DPO] turns our params into DPOConfig kwargs)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.trl_methods import RECIPES

    torch.manual_seed(0)
    recipe = RECIPES[Method.DPO]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():  # move the policy away from the reference, so the margin is not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = DpoParams(beta=0.5, loss_type=loss_type, label_smoothing=label_smoothing)
    config = recipe.config_cls(
        output_dir=str(model_dir.parent / "dpo-out"),
        per_device_train_batch_size=2,
        max_length=32,
        use_cpu=True,
        report_to="none",
        **recipe.params(params),
    )
    rows = [
        {"prompt": "What is 1 + 1?", "chosen": " 2", "rejected": " cat"},
        {"prompt": "What is 2 + 1?", "chosen": " 3", "rejected": " dog"},
    ]
    trainer = recipe.trainer_cls(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_plan_s_gradient_checkpointing_reaches_the_trl_config_without_deprecation(
    tmp_path: Path, checkpointing: bool
) -> None:
    """transformers 5 renamed TrainingArguments' `gradient_checkpointing` (removed in v6) to
    `activation_checkpointing`: the plan's flag sets the new name, and no FutureWarning."""
    import warnings

    from services.trainer import trl_methods

    plan = {"device_type": "cpu", "precision": "fp32", "gradient_checkpointing": checkpointing}
    sft = validate(JobSpec(Method.SFT, BASE, DATA))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = trl_methods.trl_config(
            sft, plan, tmp_path, trl_methods.RECIPES[Method.SFT], evals=False
        )
    assert args.activation_checkpointing is checkpointing
    assert args.gradient_checkpointing is checkpointing  # what TRL 1.16 still reads
