"""Pure pieces of the trainer: spec defaults and validation, conversion, the resource
estimate, the job store and the evaluation summary."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.trainer import convert
from services.trainer.domain import EventKind, Job, JobState, Method, Progress
from services.trainer.resources import Devices, estimate, lora_trainable
from services.trainer.spec import (
    DpoParams,
    EvaluateParams,
    GrpoParams,
    JobSpec,
    LoraParams,
    TrainingParams,
    complete,
    default_output_model,
    validate,
)
from services.trainer.store import JobStore

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}


@pytest.mark.parametrize(
    ("method", "lora", "lr"),
    [
        (Method.SFT, True, 2e-4),
        (Method.SFT, False, 2e-5),
        (Method.DPO, True, 2e-4),
        (Method.GRPO, True, 1e-5),
        (Method.PPO, False, 1e-6),
    ],
)
def test_learning_rate_defaults_follow_the_proto_table(
    method: Method, lora: bool, lr: float
) -> None:
    spec = JobSpec(method, BASE, DATA, lora=LoraParams() if lora else None)
    assert complete(spec).training.learning_rate == lr


def test_defaults_and_output_model() -> None:
    spec = validate(JobSpec(Method.DPO, BASE, DATA))
    assert spec.params == DpoParams(beta=0.1, loss_type="sigmoid", max_prompt_length=512)
    assert spec.output_model == "models/tiny-dpo" and spec.lora == LoraParams(16, 32, 0.05)
    assert default_output_model("models/" + "x" * 63 + "/revisions/r1", Method.REWARD_MODEL) == (
        "models/" + "x" * 50 + "-reward-model"
    )
    assert validate(JobSpec(Method.EVALUATE, BASE, "", eval_dataset=DATA)).output_model == ""


def test_validation_lists_every_bad_field() -> None:
    spec = JobSpec(
        Method.SFT,
        BASE,
        DATA,
        lora=LoraParams(dropout=1.5),
        training=TrainingParams(epochs=0, warmup_ratio=1.0, log_every=0),
        output_model="models/Bad Name",
    )
    with pytest.raises(InvalidArgument) as err:
        validate(spec)
    assert [v.field for v in err.value.violations] == [
        "spec.output_model",
        "spec.tuning.lora.dropout",
        "spec.training.epochs",
        "spec.training.warmup_ratio",
        "spec.training.log_every",
    ]


@pytest.mark.parametrize(("stored", "now"), [(True, "group"), (False, "none")])
def test_a_grpo_spec_stored_with_the_old_boolean_scale_rewards_still_loads(
    stored: bool, now: str
) -> None:
    data = validate(JobSpec(Method.GRPO, BASE, DATA, evaluator="evaluators/e/revisions/r1"))
    old = data.to_dict()
    old["params"]["scale_rewards"] = stored
    assert JobSpec.from_dict(old).params.scale_rewards == now  # type: ignore[union-attr]


def test_spec_survives_dict_and_proto_round_trips() -> None:
    spec = validate(JobSpec(Method.KTO, BASE, DATA, lora=None))
    assert JobSpec.from_dict(spec.to_dict()) == spec
    message = convert.spec_to_proto(spec.to_dict())
    assert message.tuning.WhichOneof("mode") == "full" and message.kto.beta == pytest.approx(0.1)
    assert validate(convert.spec_from_proto(message)) == spec
    evaluation = validate(JobSpec(Method.EVALUATE, BASE, "", eval_dataset=DATA))
    back = convert.spec_from_proto(convert.spec_to_proto(evaluation.to_dict()))
    assert validate(back) == evaluation


def test_lora_count_matches_peft(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_trainable(TINY, 8, ("all-linear",)) == trainable


def test_estimate_breakdown_by_hand() -> None:
    devices = Devices(cuda_count=0, cuda_memory_bytes=0, cpu_memory_bytes=10**9)
    training = TrainingParams(per_device_batch_size=2, max_length=10)
    spec = complete(JobSpec(Method.DPO, BASE, DATA, lora=None, training=training))
    e = estimate(spec, 1000, TINY, devices)
    # DPO: 2 sequences (chosen, rejected) per example -> 4 x 10 = 40 tokens.
    activations = 40 * 64 * 2 * 34 * 2 + 40 * 512 * 4  # fp32 doubles the 16-bit 34 bytes
    assert e.breakdown == {
        "weights": 4000,
        "gradients": 4000,
        "optimizer": 8000,
        "activations": activations,
        "reference_model": 4000,
    }
    assert e.plan.device_type == "cpu" and e.plan.precision == "fp32" and e.fits
    tiny_box = dataclasses.replace(devices, cpu_memory_bytes=100)
    assert not estimate(spec, 1000, TINY, tiny_box).fits


def _job(team: str, request_id: str = "") -> Job:
    from services.trainer.store import new_job_id

    spec = validate(JobSpec(Method.SFT, BASE, DATA)).to_dict()
    return Job(
        new_job_id(),
        team,
        spec,
        JobState.PENDING,
        {},
        Progress(),
        datetime.now(UTC),
        request_id=request_id,
    )


def test_store_idempotency_transitions_events_and_pages(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    first, created = store.create(_job("a", "r-1"))
    again, created_again = store.create(_job("a", "r-1"))
    assert created and not created_again and again.job_id == first.job_id
    other, _ = store.create(_job("b", "r-1"))  # request ids are per team
    assert other.job_id != first.job_id
    store.transition("a", first.job_id, JobState.RUNNING, "go")
    store.append(
        "a", first.job_id, EventKind.METRICS, {"step": 3, "epoch": 0.5, "values": {"loss": 1.0}}
    )
    job = store.transition("a", first.job_id, JobState.SUCCEEDED, "done", final_metrics={"x": 1.0})
    assert job.progress.step == 3 and job.final_metrics == {"x": 1.0} and job.end_time
    with pytest.raises(ValueError):
        store.transition("a", first.job_id, JobState.RUNNING, "again")
    kinds = [(e.sequence, e.kind) for e in store.events("a", first.job_id, 0)]
    assert kinds == [
        (0, EventKind.STATE),
        (1, EventKind.STATE),
        (2, EventKind.METRICS),
        (3, EventKind.STATE),
    ]
    for _ in range(3):
        store.create(_job("a"))
    page, more = store.page("a", 2, None, 0, 0)
    rest, end = store.page("a", 2, more, 0, 0)
    assert more is not None and end is None and len(page) + len(rest) == 4
    assert [j.job_id for j in store.page("a", 10, None, int(JobState.SUCCEEDED), 0)[0]] == [
        first.job_id
    ]
    store.close()


def test_cancel_of_a_queued_job_is_immediate_and_final(tmp_path: Path) -> None:
    from services.common.errors import FailedPrecondition
    from services.trainer.core import Changes, TrainerCore
    from services.trainer.resources import Devices
    from services.trainer.supervisor import Supervisor, WorkerConfig

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    changes = Changes()
    no_slots = Supervisor(store, WorkerConfig(root=tmp_path, max_running=0), changes.notify)
    core = TrainerCore(store, no_slots, changes, Devices(0, 0, 10**9))
    job, _ = store.create(_job("a"))
    no_slots.submit("a", job.job_id)
    assert core.cancel("a", job.job_id).state is JobState.CANCELLED
    assert not no_slots.withdraw("a", job.job_id)  # it left the queue
    with pytest.raises(FailedPrecondition):
        core.cancel("a", job.job_id)
    store.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 0.0, "n": 4}, "n"),
    ],
)
def test_sampling_bounds_match_the_rollout_service(kwargs: dict[str, float], field: str) -> None:
    from services.trainer.spec import Sampling

    assert [v.field for v in Sampling(**kwargs).violations("s")] == [f"s.{field}"]  # type: ignore[arg-type]
    assert Sampling(temperature=0.0, n=1).violations("s") == []


def test_unknown_enum_numbers_are_invalid_argument_naming_the_field() -> None:
    from tlm.trainer.v1 import trainer_pb2 as pb

    message = convert.spec_to_proto(validate(JobSpec(Method.SFT, BASE, DATA)).to_dict())
    message.method = 99  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        convert.spec_from_proto(message)
    assert [v.field for v in err.value.violations] == ["spec.method"]
    message.method = pb.METHOD_SFT
    message.resources.explicit.device_type = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        convert.spec_from_proto(message)
    assert [v.field for v in err.value.violations] == ["spec.resources.explicit.device_type"]
    message.resources.explicit.device_type = pb.DEVICE_TYPE_CPU
    message.resources.explicit.strategy = 9  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        convert.spec_from_proto(message)
    assert [v.field for v in err.value.violations] == ["spec.resources.explicit.strategy"]


def test_a_job_cannot_choose_the_rollout_log_prob_mode() -> None:
    """The trainer picks LogprobsMode itself (GRPO: per importance_sampling_correction), so a job
    spec's sampling.logprobs_mode is refused, naming the field, rather than ignored."""
    from tlm.rollout.v1 import rollout_pb2

    for params in (GrpoParams(), EvaluateParams()):
        method = Method.GRPO if isinstance(params, GrpoParams) else Method.EVALUATE
        message = convert.spec_to_proto(
            validate(JobSpec(method, BASE, DATA, params=params)).to_dict()
        )
        which = message.WhichOneof("method_params")
        getattr(message, which).sampling.logprobs_mode = rollout_pb2.LOGPROBS_MODE_RAW
        with pytest.raises(InvalidArgument) as err:
            convert.spec_from_proto(message)
        assert [v.field for v in err.value.violations] == [f"spec.{which}.sampling.logprobs_mode"]
        getattr(message, which).sampling.logprobs_mode = rollout_pb2.LOGPROBS_MODE_UNSPECIFIED
        assert (
            convert.spec_from_proto(message).params
            == validate(JobSpec(method, BASE, DATA, params=params)).params
        )


def test_kto_needs_two_rows_per_batch() -> None:
    spec = JobSpec(Method.KTO, BASE, DATA, training=TrainingParams(per_device_batch_size=1))
    with pytest.raises(InvalidArgument) as err:
        validate(spec)
    assert [v.field for v in err.value.violations] == ["spec.training.per_device_batch_size"]
    validate(dataclasses.replace(spec, method=Method.SFT))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("UNAVAILABLE", "UNAVAILABLE"),
        ("DEADLINE_EXCEEDED", "UNAVAILABLE"),
        ("UNAUTHENTICATED", "FAILED_PRECONDITION"),
        ("PERMISSION_DENIED", "PERMISSION_DENIED"),
        ("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
        ("INTERNAL", "INTERNAL"),
        ("NOT_FOUND", "NOT_FOUND"),
    ],
)
async def test_registry_errors_at_creation_keep_their_meaning(code: str, expected: str) -> None:
    """What the registry client raises (its classifier's domain error) reaches the job's
    creator with the registry's meaning; only an outage and the trainer's own key are
    restated, the first as UNAVAILABLE, the second as this deployment's precondition."""
    import grpc

    from services.clients.errors import to_domain
    from services.common.errors import status_code_for
    from services.trainer.registry_port import field_errors

    error = grpc.aio.AioRpcError(
        grpc.StatusCode[code], grpc.aio.Metadata(), grpc.aio.Metadata(), "x"
    )
    with pytest.raises(Exception) as err:
        async with field_errors("spec.base_model", BASE):
            raise to_domain(error, "registry", "127.0.0.1:1")
    assert status_code_for(err.value).name == expected


def test_full_tuning_on_cuda_counts_fp32_weights_and_no_master_copy() -> None:
    devices = Devices(cuda_count=1, cuda_memory_bytes=10**12, cpu_memory_bytes=10**9)
    full = complete(JobSpec(Method.SFT, BASE, DATA, lora=None))
    e = estimate(full, 1000, TINY, devices)
    assert e.plan.precision == "bf16"
    assert (e.breakdown["weights"], e.breakdown["optimizer"]) == (4000, 8000)
    lora = complete(JobSpec(Method.SFT, BASE, DATA, lora=LoraParams(r=4)))
    assert estimate(lora, 1000, TINY, devices).breakdown["weights"] == 2000  # frozen, 16 bits


def test_estimate_notes_for_evaluate_unknown_targets_and_missing_counts() -> None:
    devices = Devices(cuda_count=0, cuda_memory_bytes=0, cpu_memory_bytes=10**9)
    evaluation = complete(JobSpec(Method.EVALUATE, BASE, "", eval_dataset=DATA))
    assert sum(estimate(evaluation, 1000, TINY, devices).breakdown.values()) == 0
    lora = LoraParams(r=4, target_modules=("qkv_proj",))
    e = estimate(complete(JobSpec(Method.SFT, BASE, DATA, lora=lora)), 10_000, TINY, devices)
    assert e.trainable_parameter_count == 50  # the 0.5% guess, not 0
    e = estimate(complete(JobSpec(Method.SFT, BASE, DATA)), 0, TINY, devices)
    assert any("parameter_count" in note for note in e.notes)


def test_request_ids_are_unique_per_team_in_the_database(tmp_path: Path) -> None:
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    from services.trainer.store import JobRow

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    first, _ = store.create(_job("a", "r-1"))
    store.create(_job("a"))
    store.create(_job("a"))  # empty request ids do not collide
    with pytest.raises(IntegrityError), Session(store.engine) as s, s.begin():
        row = JobRow(
            job_id="j-dup", team="a", request_id="r-1", method=1, spec={}, state=1,
            create_time=datetime.now(UTC),
        )  # fmt: skip
        s.add(row)

    def lost_race(job: Job) -> tuple[Job, bool]:  # another create inserted after the lookup
        raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))

    store._create = lost_race  # type: ignore[method-assign]
    again, created = store.create(_job("a", "r-1"))
    assert not created and again.job_id == first.job_id
    store.close()


def test_a_second_trainer_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    from services.trainer.app import owner_lock

    lock = owner_lock(tmp_path)
    with pytest.raises(RuntimeError, match="another trainer"):
        owner_lock(tmp_path)
    lock.close()
    owner_lock(tmp_path).close()


async def test_a_reused_request_id_must_repeat_the_spec(tmp_path: Path) -> None:
    from services.trainer.core import Changes, CreateRequest, TrainerCore
    from services.trainer.domain import RequestIdReused
    from services.trainer.resources import Devices
    from services.trainer.supervisor import Supervisor, WorkerConfig

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    changes = Changes()
    no_slots = Supervisor(store, WorkerConfig(root=tmp_path, max_running=0), changes.notify)
    core = TrainerCore(store, no_slots, changes, Devices(0, 0, 10**9))
    spec = JobSpec(Method.SFT, BASE, DATA)
    stored = dataclasses.replace(_job("a", "r-1"), request_digest=validate(spec).digest())
    job, _ = store.create(stored)
    again = await core.create("a", CreateRequest(spec, request_id="r-1"))  # no registry call
    assert again.job_id == job.job_id
    other = dataclasses.replace(spec, training=TrainingParams(seed=1))
    with pytest.raises(RequestIdReused) as err:
        await core.create("a", CreateRequest(other, request_id="r-1"))
    assert [v.field for v in err.value.violations] == ["request_id"]
    legacy, _ = store.create(_job("a", "r-old"))  # stored before digests: answered as before
    assert (
        await core.create("a", CreateRequest(other, request_id="r-old"))
    ).job_id == legacy.job_id
    store.close()
