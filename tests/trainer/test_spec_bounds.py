"""Every numeric training field has a range: the BOUNDS tables cover the proto's numeric fields,
each bound refuses the values just outside it, and a real trainer refuses them even with
validate_only."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.errors import InvalidArgument
from services.trainer.domain import Method
from services.trainer.spec import (
    DevicePlan,
    DpoParams,
    EvaluateParams,
    GrpoParams,
    JobSpec,
    KtoParams,
    LoraParams,
    PpoParams,
    RewardModelParams,
    Sampling,
    SftParams,
    TrainingParams,
    validate,
)
from tests.trainer.conftest import Inputs, spec
from tlm.rollout.v1 import rollout_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

Stub = trainer_pb2_grpc.TrainerServiceStub
BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
NUMERIC = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_DOUBLE,
}
# The domain class that holds each params message of a TrainingJobSpec.
DOMAIN: dict[Descriptor, Any] = {
    pb.LoraConfig.DESCRIPTOR: LoraParams,
    pb.TrainingParams.DESCRIPTOR: TrainingParams,
    pb.SftParams.DESCRIPTOR: SftParams,
    pb.DpoParams.DESCRIPTOR: DpoParams,
    pb.KtoParams.DESCRIPTOR: KtoParams,
    pb.RewardModelParams.DESCRIPTOR: RewardModelParams,
    pb.GrpoParams.DESCRIPTOR: GrpoParams,
    pb.PpoParams.DESCRIPTOR: PpoParams,
    pb.EvaluateParams.DESCRIPTOR: EvaluateParams,
    pb.DevicePlan.DESCRIPTOR: DevicePlan,
    pb.AutoResources.DESCRIPTOR: DevicePlan,
    rollout_pb2.SamplingParams.DESCRIPTOR: Sampling,
}
# Bounded elsewhere: the rollout service's own sampling rules (SamplingSpec.problems).
ROLLOUT_RULES = {"n", "temperature", "top_p", "max_tokens"}


def _messages(descriptor: Descriptor) -> set[Descriptor]:
    """Every message type a TrainingJobSpec can hold, however deep."""
    found = {descriptor}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type not in found:
            found |= _messages(f.message_type)
    return found


def test_every_numeric_field_of_a_spec_has_a_bound() -> None:
    missing = []
    for message in _messages(pb.TrainingJobSpec.DESCRIPTOR):
        numeric = {f.name for f in message.fields if f.type in NUMERIC}
        if not numeric:
            continue
        cls = DOMAIN.get(message)
        assert cls is not None, f"{message.full_name} has numeric fields but no domain class"
        skip = ROLLOUT_RULES if cls is Sampling else set()
        skip |= {"alpha_value"} if cls is LoraParams else set()  # LoraParams.alpha's bound
        missing += [f"{message.name}.{n}" for n in sorted(numeric - skip - set(cls.BOUNDS))]
    assert missing == []
    for cls in set(DOMAIN.values()):  # and no table names a field its class lacks
        assert set(cls.BOUNDS) <= {f.name for f in dataclasses.fields(cls)}, cls


def _outside(cls: Any, name: str) -> list[Any]:
    """Values just outside the bound of `cls.name` (of its field's type)."""
    bound = cls.BOUNDS[name]
    annotation = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    is_int = "int" in str(annotation)  # "int", "int | None" or "float", "float | None"
    step = 1 if is_int else 1e-9
    low = bound.lo if bound.open_lo else bound.lo - step
    high = bound.hi if bound.open_hi else bound.hi + step
    return [low, high] if is_int else [low, high, math.nan, math.inf]


CASES = [(cls, name) for cls in sorted(set(DOMAIN.values()), key=str) for name in cls.BOUNDS]


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_each_bound_refuses_the_values_just_outside(cls: Any, name: str) -> None:
    for value in _outside(cls, name):
        instance = cls(**{name: value})
        fields = [v.field for v in instance.violations("p")]
        assert f"p.{name}" in fields, (name, value)
    bound = cls.BOUNDS[name]
    for inside in (bound.lo, bound.hi):
        open_end = bound.open_lo if inside == bound.lo else bound.open_hi
        if not open_end:
            instance = cls(**{name: inside})
            assert f"p.{name}" not in [v.field for v in instance.violations("p")]


def _violations(**parts: Any) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        validate(JobSpec(Method.SFT, BASE, DATA, **parts))
    return [f"{v.field}: {v.description}" for v in err.value.violations]


def test_the_reviewed_values_are_refused_naming_field_and_range() -> None:
    assert _violations(
        lora=LoraParams(r=10**6, target_modules=("../x",)),
        training=TrainingParams(per_device_batch_size=2**31 - 1, max_length=2**31 - 1),
    ) == [
        "spec.tuning.lora.r: must be in [1, 1024]",
        "spec.tuning.lora.target_modules[0]: '../x' is not a module name such as q_proj or "
        "model.layers.0.mlp, nor 'all-linear'",
        "spec.training.per_device_batch_size: must be in [1, 1024]",
        "spec.training.max_length: must be in [8, 131072] (tokens)",
    ]


@pytest.mark.parametrize(
    "modules",
    [("q_proj", "v_proj"), ("model.layers.0.self_attn.q_proj",), ("all-linear",), ("_x1",)],
)
def test_module_names_and_the_wildcard_are_accepted(modules: tuple[str, ...]) -> None:
    validate(JobSpec(Method.SFT, BASE, DATA, lora=LoraParams(target_modules=modules)))


@pytest.mark.parametrize(
    ("modules", "field"),
    [
        (("q_proj", ""), "target_modules[1]"),
        (("q proj",), "target_modules[0]"),
        (("q_proj", "a..b"), "target_modules[1]"),
        (("mlp.*",), "target_modules[0]"),
        (("x" * 201,), "target_modules[0]"),
        (("all-linear", "q_proj"), "target_modules"),
        (tuple(f"m{i}" for i in range(65)), "target_modules"),
    ],
)
def test_other_module_names_are_refused(modules: tuple[str, ...], field: str) -> None:
    lora = LoraParams(target_modules=modules)
    assert [v.field for v in lora.violations("l")] == [f"l.{field}"]


def test_grpo_names_num_generations_once_and_caps_sampling() -> None:
    params = GrpoParams(num_generations=10**6)
    assert [v.field for v in params.violations("g")] == ["g.num_generations"]
    sampling = Sampling(max_tokens=2**31 - 1, top_k=2**31 - 1, seed=-1)
    assert [v.field for v in sampling.violations("s")] == ["s.max_tokens", "s.top_k", "s.seed"]


async def test_validate_only_refuses_out_of_range_fields(trainer: Stub, inputs: Inputs) -> None:
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft)
    job_spec.tuning.lora.r = 10**6
    job_spec.tuning.lora.target_modules.append("../x")
    job_spec.training.per_device_batch_size = 2**31 - 1
    job_spec.training.max_length = 2**31 - 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.CreateTrainingJob(
            pb.CreateTrainingJobRequest(spec=job_spec, validate_only=True)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for problem in (
        "spec.tuning.lora.r: must be in [1, 1024]",
        "spec.tuning.lora.target_modules[0]: '../x' is not a module name",
        "spec.training.per_device_batch_size: must be in [1, 1024]",
        "spec.training.max_length: must be in [8, 131072]",
    ):
        assert problem in (err.value.details() or ""), problem
