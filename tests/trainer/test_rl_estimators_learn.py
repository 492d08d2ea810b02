"""RLOO and REINFORCE++ learn the demo task through the real services (registry, rollout,
reward and trainer in one server, as `tlm up`): "What is a + b?" prompts, a reward of 1 for
a digit in the completion (the random tiny model earns it in ~1 of 8 samples), full tuning at
lr 0.01, 8 prompts x 8 completions of at most 6 tokens per step, fixed seeds
(services/devtools/demo.py runs GRPO on the same task). Each job's mean reward starts below
0.2 and its last steps average above 0.8."""

from __future__ import annotations

import json

import pytest

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from tests.trainer.conftest import Inputs, wait_for, watch
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
FIRST_BELOW, LAST_ABOVE, LAST_STEPS = 0.2, 0.8, 5  # step 1 below, mean of the last 5 above
# Steps with a margin (measured on CPU, services/trainer/README.md): at 20 the last 5 steps
# average 0.96 (RLOO) and 0.93 (REINFORCE++); at 15 both are at 0.80 +- 0.02, too close.
STEPS = {"rloo": 20, "reinforce_pp": 20}


@pytest.fixture(scope="module")
async def arith(stack: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("arith") / "arith.jsonl"
    rows = [
        {"prompt": f"What is {a} + {b}?", "reference": str(a + b)}
        for a in range(1, 5)
        for b in range(1, 5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry = RegistryClient(stack.address)
    try:
        revision = await registry.upload_dataset_file(
            "datasets/arith-estimators", path, registry_pb2.DATASET_KIND_PROMPT
        )
    finally:
        await registry.close()
    return revision.name


def learning_spec(inputs: Inputs, dataset: str, estimator: str) -> pb.TrainingJobSpec:
    return pb.TrainingJobSpec(
        method=pb.METHOD_GRPO,
        base_model=inputs.base,
        train_dataset=dataset,
        evaluator=inputs.evaluator,  # a digit anywhere: reward 1
        output_model=f"models/tiny-{estimator.replace('_', '-')}",
        tuning=pb.Tuning(full=pb.FullTuning()),
        training=pb.TrainingParams(
            max_steps=STEPS[estimator],
            per_device_batch_size=8,
            learning_rate=0.01,
            seed=1,
            log_every=1,
            save_every=0,
        ),
        grpo=pb.GrpoParams(
            num_generations=8,
            beta=0.04,
            advantage_estimator=estimator,
            sampling={"max_tokens": 6, "seed": 1},
        ),
    )


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
async def test_the_estimator_learns_the_demo_task(
    trainer: Stub, inputs: Inputs, arith: str, estimator: str
) -> None:
    spec = learning_spec(inputs, arith, estimator)
    job = await trainer.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=spec))
    done = await wait_for(trainer, job.name, timeout=1200)
    assert done.state == pb.TrainingJob.STATE_SUCCEEDED, done.error.message
    events = await watch(trainer, job.name)
    rewards = [e.metrics.values["reward_mean"] for e in events if e.HasField("metrics")]
    assert len(rewards) == STEPS[estimator]
    assert rewards[0] < FIRST_BELOW
    assert sum(rewards[-LAST_STEPS:]) / LAST_STEPS > LAST_ABOVE
