"""Online training and the judge scorer across two rollout replicas behind one round-robin
address: GRPO pushes its weights to both (no registry revision per step), every Generate lands on
a replica that holds the version it names, and a judge model loads on whichever replica answers."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from services.common.server import ServiceBinding
from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.reward import app as reward_app
from services.reward.settings import RewardSettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from services.trainer.supervisor import DEFAULT_WORKER
from tests.reward.helpers import sample, spec
from tests.trainer.conftest import Inputs, push_vowels, start_trainer, wait_for, watch
from tests.trainer.test_grpo import grpo_spec
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow


def bindings(settings: RolloutSettings) -> list[ServiceBinding]:
    return [rollout_app.binding(settings)]


@pytest.fixture(scope="module")
def rollouts(stack: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two rollout replicas on the stack's registry; their round-robin target."""
    servers = []
    for i in range(2):
        settings = RolloutSettings(
            host="127.0.0.1",
            port=0,
            insecure_dev=True,
            data_dir=tmp_path_factory.mktemp(f"replica{i}"),
            registry_address=stack.address,
        )
        servers.append(ServerThread(partial(bindings, settings), settings).start())
    yield "ipv4:" + ",".join(s.address for s in servers)
    for server in servers:
        server.stop()


def replica_statuses(target: str) -> list[rollout_pb2.EngineStatus]:
    out = []
    for address in target.removeprefix("ipv4:").split(","):
        with grpc.insecure_channel(address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            out.append(stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), timeout=10))
    return out


@pytest.fixture(scope="module")
async def vowels(stack: ServerThread) -> str:
    return await push_vowels(stack, "evaluators/vowels-replicas", "replicas-vowels")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
async def test_grpo_pushes_to_both_replicas_and_publishes_only_when_asked(
    stack: ServerThread, rollouts: str, inputs: Inputs, vowels: str, tmp_path: Path, lora: bool
) -> None:
    trainer_server = start_trainer(
        tmp_path,
        stack.address,
        DEFAULT_WORKER,
        rollout_address=rollouts,
        reward_address=stack.address,
    )
    channel = grpc.aio.insecure_channel(trainer_server.address)
    try:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        job_spec = grpo_spec(inputs, vowels)
        job_spec.output_model = f"models/tiny-grpo-replicas-{'lora' if lora else 'full'}"
        job_spec.training.save_every = 0
        if not lora:  # and a registry revision every 2 steps besides the end
            job_spec.tuning.CopyFrom(pb.Tuning(full=pb.FullTuning()))
            job_spec.grpo.publish_every = 2
        created = await trainer.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=job_spec))
        job = await wait_for(trainer, created.name, timeout=240)
        assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
        events = await watch(trainer, job.name)
    finally:
        await channel.close(None)
        trainer_server.stop()
    metrics = [e.metrics.values for e in events if e.HasField("metrics")]
    assert len(metrics) == 3
    # Steps 2 and 3 sampled from the pushed steps 1 and 2: the trainer recomputes the rollout's
    # log-probs on its own weights and they agree, so the replica served the pushed weights.
    for values in metrics:
        assert values["logprob_mismatch"] < 1e-3 and values["valid_fraction"] == 1.0
    job_id = job.name.removeprefix("jobs/")
    # The last push: step 2 (LoRA; step 3 is the end), step 1 (full; step 2 was published).
    pushed = f"jobs/{job_id}@step-{2 if lora else 1}"
    for status in replica_statuses(rollouts):  # both replicas got the pushes
        held = list(status.cached_models) + [a.adapter_revision for a in status.adapters]
        assert pushed in held and status.generated_tokens_total > 0
    registry = RegistryClient(stack.address)
    try:
        request = registry_pb2.ListModelRevisionsRequest(parent=job_spec.output_model)
        listed = await registry.stub.ListModelRevisions(request, metadata=registry.metadata())
    finally:
        await registry.close()
    # Not one revision per step: the end (no checkpoints asked for), and step 2 with
    # publish_every 2.
    names = {r.name for r in listed.revisions}
    assert len(names) == (1 if lora else 2) and job.output_model_revision in names


def test_a_judge_scores_through_either_replica(
    stack: ServerThread, rollouts: str, inputs: Inputs, tmp_path: Path
) -> None:
    settings = RewardSettings(
        host="127.0.0.1",
        port=0,
        insecure_dev=True,
        data_dir=tmp_path,
        registry_address=stack.address,
        rollout_address=rollouts,
    )
    before = [s.generated_tokens_total for s in replica_statuses(rollouts)]
    judge = {"rubric": "Rate it: {completion}\nScore:", "max_tokens": 3}
    evaluator = spec(
        {"scorers": [{"name": "judge", "judge": judge | {"model_revision": inputs.base}}]}
    )
    server = ServerThread(lambda: [reward_app.binding(settings)], settings)
    with server, grpc.insecure_channel(server.address) as channel:
        reward = rs_grpc.RewardServiceStub(channel)
        for i in range(4):
            request = rs.ScoreRequest(spec=evaluator, samples=[sample(f"s{i}", f"answer {i}")])
            result = reward.Score(request, timeout=120).results[0]
            # The tiny model writes no score: UNSCORABLE, not ERROR (the rollout answered).
            assert result.status == rs.SCORE_STATUS_UNSCORABLE, result.reason
    after = [s.generated_tokens_total for s in replica_statuses(rollouts)]
    assert all(a > b for a, b in zip(after, before, strict=True))  # round robin: both judged
