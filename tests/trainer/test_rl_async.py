"""Asynchronous rollout end to end: a GRPO job with max_policy_lag 1 on the services generates
batch k+1 while it trains on batch k (seen in the job's own metrics), trains the right number
of steps on samples one policy old, and the parameter is checked at creation."""

from __future__ import annotations

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from tests.rpc_details import rpc_details
from tests.trainer.conftest import Inputs, push_vowels, spec, wait_for, watch
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
STEPS, GROUP = 4, 4


@pytest.fixture(scope="module")
async def vowels(stack: ServerThread, inputs: Inputs) -> str:
    return await push_vowels(stack, "evaluators/vowels-async", "async-vowels")


def async_spec(inputs: Inputs, evaluator: str, **grpo: object) -> pb.TrainingJobSpec:
    params = {
        "num_generations": GROUP,
        "max_policy_lag": 1,
        "sampling": {"max_tokens": 8, "seed": 3, "temperature": 0.7},
    }
    return spec(
        pb.METHOD_GRPO,
        inputs.base,
        inputs.prompts,
        evaluator=evaluator,
        tuning=pb.Tuning(lora=pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        output_model="models/tiny-grpo-async",
        training=pb.TrainingParams(
            max_steps=STEPS, per_device_batch_size=2, log_every=1, learning_rate=1e-2
        ),
        grpo=pb.GrpoParams(**(params | grpo)),  # type: ignore[arg-type]
    )


async def test_grpo_with_max_policy_lag_1_overlaps_generation_and_training(
    trainer: Stub, inputs: Inputs, vowels: str
) -> None:
    created = await trainer.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec=async_spec(inputs, vowels))
    )
    assert created.spec.grpo.max_policy_lag == 1
    job = await wait_for(trainer, created.name, timeout=300)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error.message
    assert job.progress.step == STEPS and job.output_model_revision
    events = await watch(trainer, created.name)
    steps = {e.metrics.step: dict(e.metrics.values) for e in events if e.HasField("metrics")}
    assert sorted(steps) == list(range(1, STEPS + 1))
    for k in range(1, STEPS):
        # The worker's own clock: batch k+1's generation began before step k's update ended.
        assert steps[k + 1]["timeline/generate_start"] < steps[k]["timeline/update_end"], k
    # Batch 1 comes from the base; each later one from the policy one publication old.
    assert [steps[k]["policy/lag"] for k in steps] == [0.0] + [1.0] * (STEPS - 1)
    assert all(values["policy/stale_dropped"] == 0 for values in steps.values())
    # The truncated IS weights min(pi_old / pi_rollout, cap) were applied to every step.
    assert all(0 < values["importance_ratio_mean"] <= 3.0 for values in steps.values())


@pytest.mark.parametrize(
    ("grpo", "field", "expected"),
    [
        ({"max_policy_lag": 2}, "spec.grpo.max_policy_lag", "must be in [0, 1]"),
        (
            {"importance_sampling_correction": False},
            "spec.grpo.max_policy_lag",
            "needs spec.grpo.importance_sampling_correction",
        ),
    ],
)
async def test_max_policy_lag_is_checked_at_creation(
    trainer: Stub, inputs: Inputs, vowels: str, grpo: dict[str, object], field: str, expected: str
) -> None:
    request = pb.CreateTrainingJobRequest(spec=async_spec(inputs, vowels, **grpo))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.CreateTrainingJob(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = dict(rpc_details(err.value).violations)
    assert expected in violations[field], violations
