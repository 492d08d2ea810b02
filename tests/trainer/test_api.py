"""The trainer API's refusals and reads on a real server: every bad input is named, nothing is
created for it, and EstimateResources works out the budget from registry metadata."""

from __future__ import annotations

import grpc
import pytest
import torch

from tests.rpc_details import rpc_details
from tests.trainer.conftest import Inputs, spec
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

Stub = trainer_pb2_grpc.TrainerServiceStub


async def refused(
    stub: Stub, job_spec: pb.TrainingJobSpec
) -> tuple[grpc.aio.AioRpcError, list[str], str]:
    """Create must fail: (error, violated fields, ErrorInfo reason)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=job_spec))
    details = rpc_details(err.value)
    return err.value, details.fields, details.reason


async def test_bad_hyperparameters_are_invalid_argument_per_field(
    trainer: Stub, inputs: Inputs
) -> None:
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft)
    job_spec.training.learning_rate = -1
    job_spec.training.lr_scheduler = "wavy"
    job_spec.tuning.lora.r = 0
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {
        "spec.training.learning_rate",
        "spec.training.lr_scheduler",
        "spec.tuning.lora.r",
    }


async def test_params_of_another_method_are_refused(trainer: Stub, inputs: Inputs) -> None:
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, dpo=pb.DpoParams(beta=0.1))
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and fields == ["spec.method_params"]


async def test_fields_the_method_does_not_use_are_refused_by_name(
    trainer: Stub, inputs: Inputs
) -> None:
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, evaluator=inputs.evaluator)
    job_spec.training.eval_every = 2  # without an eval_dataset
    job_spec.dpo.label_smoothing = 0.1  # sigmoid, not robust
    job_spec.method = pb.METHOD_DPO
    job_spec.train_dataset = inputs.preference
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["spec.evaluator", "spec.training.eval_every", "spec.dpo.label_smoothing"]
    assert "DPO does not use it" in (err.details() or "")
    job_spec.ClearField("evaluator")
    job_spec.training.eval_every = 0
    job_spec.dpo.loss_type = "robust"
    request = pb.CreateTrainingJobRequest(spec=job_spec, validate_only=True)
    job = await trainer.CreateTrainingJob(request)
    assert job.spec.dpo.label_smoothing == pytest.approx(0.1)


async def test_a_request_id_used_with_another_spec_is_refused(
    trainer: Stub, inputs: Inputs
) -> None:
    first = spec(pb.METHOD_SFT, inputs.base, inputs.sft, output_model="models/never-trained")
    first.training.max_steps = 10**6  # queued behind the slots or cancelled below
    request = pb.CreateTrainingJobRequest(spec=first, request_id="api-reuse")
    job = await trainer.CreateTrainingJob(request)
    try:
        assert (await trainer.CreateTrainingJob(request)).name == job.name  # a retry
        request.spec.training.learning_rate = 5e-4
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trainer.CreateTrainingJob(request)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert job.name in (err.value.details() or "") and "another spec" in err.value.details()
    finally:
        await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=job.name))


async def test_a_dataset_of_the_wrong_kind_says_what_the_method_needs(
    trainer: Stub, inputs: Inputs
) -> None:
    err, fields, reason = await refused(trainer, spec(pb.METHOD_DPO, inputs.base, inputs.sft))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        "DPO needs a preference dataset (prompt, chosen, rejected); datasets/sft is sft"
    )
    assert fields == ["spec.train_dataset"] and reason == "DATASET_KIND_MISMATCH"
    err, _, _ = await refused(trainer, spec(pb.METHOD_KTO, inputs.base, inputs.preference))
    assert "unpaired_preference dataset" in err.details()


@pytest.mark.parametrize(
    ("field", "value"),
    [("base_model", "models/nope/revisions/r1"), ("train_dataset", "datasets/nope")],
)
async def test_unknown_inputs_are_not_found_naming_the_field(
    trainer: Stub, inputs: Inputs, field: str, value: str
) -> None:
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft)
    setattr(job_spec, field, value)
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.NOT_FOUND and fields == [f"spec.{field}"]


async def test_missing_and_malformed_names(trainer: Stub, inputs: Inputs) -> None:
    err, fields, _ = await refused(trainer, spec(pb.METHOD_SFT, "tiny", ""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["spec.base_model", "spec.train_dataset"]
    err, fields, _ = await refused(trainer, spec(pb.METHOD_UNSPECIFIED, inputs.base, inputs.sft))
    assert fields == ["spec.method"]
    job_spec = spec(
        pb.METHOD_EVALUATE,
        inputs.base,
        "",
        eval_dataset=inputs.prompts,
        training=pb.TrainingParams(),
    )
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and fields == ["spec.evaluator"]


async def test_ppo_refuses_max_length_it_does_not_read(trainer: Stub, inputs: Inputs) -> None:
    """PPO runs (tests/trainer/test_ppo.py); its completions are bounded by sampling.max_tokens."""
    job_spec = spec(pb.METHOD_PPO, inputs.base, inputs.prompts, evaluator=inputs.evaluator)
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["spec.training.max_length"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only host")
async def test_an_explicit_gpu_plan_without_a_gpu(trainer: Stub, inputs: Inputs) -> None:
    plan = pb.DevicePlan(device_type=pb.DEVICE_TYPE_CUDA)
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, resources=pb.Resources(explicit=plan))
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fields == ["spec.resources.explicit.device_type"]


async def test_validate_only_fills_defaults_and_creates_nothing(
    trainer: Stub, inputs: Inputs
) -> None:
    job_spec = pb.TrainingJobSpec(
        method=pb.METHOD_SFT, base_model="models/tiny", train_dataset="datasets/sft"
    )
    request = pb.CreateTrainingJobRequest(spec=job_spec, validate_only=True, request_id="v-1")
    job = await trainer.CreateTrainingJob(request)
    s = job.spec
    assert s.base_model == inputs.base and s.train_dataset == inputs.sft  # aliases resolved
    assert s.tuning.lora.r == 16 and s.tuning.lora.alpha_value == 32.0
    assert not s.tuning.lora.HasField("alpha")  # the deprecated int32 is never sent back
    assert s.tuning.lora.dropout == pytest.approx(0.05)
    assert s.training.learning_rate == pytest.approx(2e-4)  # the LoRA default
    assert (s.training.per_device_batch_size, s.training.max_length) == (8, 1024)
    assert s.training.lr_scheduler == "cosine" and s.training.save_every == 500
    assert s.sft.completion_only_loss and s.output_model == "models/tiny-sft"
    assert job.state == pb.TrainingJob.STATE_PENDING and job.device_plan.precision in (
        "fp32",
        "bf16",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.GetTrainingJob(pb.GetTrainingJobRequest(name=job.name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_lora_alpha_is_a_float_and_the_int32_alpha_still_works(
    trainer: Stub, inputs: Inputs
) -> None:
    async def alpha(lora: pb.LoraConfig) -> pb.LoraConfig:
        job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, tuning=pb.Tuning(lora=lora))
        request = pb.CreateTrainingJobRequest(spec=job_spec, validate_only=True)
        return (await trainer.CreateTrainingJob(request)).spec.tuning.lora

    assert (await alpha(pb.LoraConfig(r=4, alpha_value=12.5))).alpha_value == 12.5
    old = await alpha(pb.LoraConfig(r=4, alpha=8))  # a client from before alpha_value
    assert old.alpha_value == 8.0 and not old.HasField("alpha")
    both = spec(
        pb.METHOD_SFT,
        inputs.base,
        inputs.sft,
        tuning=pb.Tuning(lora=pb.LoraConfig(alpha=8, alpha_value=8)),
    )
    err, fields, _ = await refused(trainer, both)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["spec.tuning.lora.alpha_value"] and "spec.tuning.lora.alpha" in (
        err.details() or ""
    )
    low = spec(
        pb.METHOD_SFT,
        inputs.base,
        inputs.sft,
        tuning=pb.Tuning(lora=pb.LoraConfig(alpha_value=0.5)),
    )
    err, fields, _ = await refused(trainer, low)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and fields == ["spec.tuning.lora.alpha"]


async def test_get_and_cancel_unknown_or_malformed(trainer: Stub) -> None:
    for name, code in (
        ("jobs/j-nope", grpc.StatusCode.NOT_FOUND),
        ("x/y/z", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trainer.GetTrainingJob(pb.GetTrainingJobRequest(name=name))
        assert err.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
        assert err.value.code() == code


async def test_estimate_resources_for_lora_and_full_dpo(trainer: Stub, inputs: Inputs) -> None:
    # The tiny model: hidden 64, 2 layers, 4 heads (2 kv, head_dim 16), MLP 128, vocab 512.
    lora = await trainer.EstimateResources(
        pb.EstimateResourcesRequest(spec=spec(pb.METHOD_SFT, inputs.base, inputs.sft))
    )
    assert lora.parameter_count > 100_000
    # r=16 * 2 layers * (q 128 + k 96 + v 96 + o 128 + gate 192 + up 192 + down 192)
    assert lora.trainable_parameter_count == 16 * 2 * 1024
    b = lora.memory_breakdown_bytes
    assert b["weights"] == lora.parameter_count * 4  # fp32 on CPU
    assert b["gradients"] == 32768 * 4 and b["optimizer"] == 32768 * 8
    assert b["reference_model"] == 0 and b["activations"] > 0
    assert lora.memory_per_device_bytes == sum(b.values()) and lora.fits
    if not torch.cuda.is_available():
        assert lora.plan.device_type == pb.DEVICE_TYPE_CPU and lora.plan.precision == "fp32"
    full = pb.Tuning(full=pb.FullTuning())
    dpo = await trainer.EstimateResources(
        pb.EstimateResourcesRequest(
            spec=spec(pb.METHOD_DPO, inputs.base, inputs.preference, tuning=full)
        )
    )
    assert dpo.trainable_parameter_count == dpo.parameter_count
    assert dpo.memory_breakdown_bytes["reference_model"] == dpo.memory_breakdown_bytes["weights"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.EstimateResources(
            pb.EstimateResourcesRequest(spec=spec(pb.METHOD_DPO, inputs.base, inputs.sft))
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
