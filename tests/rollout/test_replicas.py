"""Stateless serving and pushed policies on real servers: two replicas behind one round-robin
address serve requests that name their model (no LoadModel), and PushWeights makes in-memory
policy versions that Generate names."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.rollout.convert import push_to_proto
from services.rollout.push import PushHeader, TensorPiece, tensor_pieces
from services.rollout.weights import LocalWeights, ResolvedRevision, WeightFormat
from tests.rollout.conftest import LORA_R1, LORA_R2, MODEL, RolloutServerFactory
from tests.rpc_details import rpc_details
from tlm.common.v1 import common_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

Stub = rollout_pb2_grpc.RolloutServiceStub
ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]  # as the clients balance
PERTURBED = "models/tiny-perturbed/revisions/r1"


def greedy(model: str = "", adapter: str = "", n_prompts: int = 1) -> rollout_pb2.GenerateRequest:
    return rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=f"The red cat {i}") for i in range(n_prompts)],
        sampling=rollout_pb2.SamplingParams(temperature=0.0, max_tokens=8),
        model_revision=model,
        adapter_revision=adapter,
    )


def completions(stub: Stub, request: rollout_pb2.GenerateRequest) -> list[rollout_pb2.Completion]:
    out = [c for r in stub.Generate(request, timeout=60) for c in r.completions]
    return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))


def push(stub: Stub, header: PushHeader, tensors: dict[str, torch.Tensor]) -> str:
    pieces = (p for name, t in tensors.items() for p in tensor_pieces(name, t))
    return str(stub.PushWeights(push_to_proto(header, pieces), timeout=60).policy_version)


def full(policy: str, step: int, tensors: dict[str, torch.Tensor]) -> PushHeader:
    return PushHeader(policy, step, MODEL, False, "", len(tensors))


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its MLP weights scaled: other greedy outputs than the base's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "mlp" in name:
                weight.mul_(-3.0)
    out = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(tiny_model_dir, out)  # the tokenizer and config too
    model.save_pretrained(out)
    return out


@pytest.fixture
def weights(local_weights: LocalWeights, perturbed: Path) -> LocalWeights:
    local_weights.add(ResolvedRevision(PERTURBED, WeightFormat.FULL, perturbed))
    return local_weights


@pytest.fixture
def replicas(rollout_server: RolloutServerFactory, weights: LocalWeights) -> Iterator[list[Stub]]:
    """Two replicas, and a round-robin channel over both (last in the list)."""
    servers = [rollout_server(), rollout_server()]
    target = "ipv4:" + ",".join(s.address for s in servers)
    channels = [grpc.insecure_channel(s.address) for s in servers]
    channels.append(grpc.insecure_channel(target, options=ROUND_ROBIN))
    yield [Stub(c) for c in channels]
    for channel in channels:
        channel.close()


def status(stub: Stub) -> rollout_pb2.EngineStatus:
    return stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), timeout=10)


def test_any_replica_serves_a_request_that_names_its_model(replicas: list[Stub]) -> None:
    a, b, balanced = replicas
    with pytest.raises(grpc.RpcError) as err:  # naming nothing needs a LoadModel, per replica
        completions(balanced, greedy())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    outputs = [completions(balanced, greedy(MODEL)) for _ in range(4)]
    assert all(c.policy_version == MODEL for out in outputs for c in out)
    assert len({tuple(out[0].token_ids) for out in outputs}) == 1  # same weights everywhere
    for replica in (a, b):  # round robin: both loaded it on demand and both generated
        seen = status(replica)
        assert list(seen.cached_models) == [MODEL] and seen.generated_tokens_total > 0
        assert seen.model_revision == ""  # no LoadModel happened
    # An adapter alone: its base comes from its lineage, loaded on whichever replica.
    adapted = [completions(balanced, greedy(adapter=LORA_R1)) for _ in range(2)]
    assert all(out[0].policy_version == LORA_R1 for out in adapted)
    assert adapted[0][0].token_ids == adapted[1][0].token_ids != outputs[0][0].token_ids


def test_pushed_full_weights_serve_and_a_newer_step_replaces_the_older_in_place(
    replicas: list[Stub], perturbed: Path, tiny_model_dir: Path
) -> None:
    stub = replicas[0]
    changed = load_file(perturbed / "model.safetensors")
    version = push(stub, full("jobs/j1", 1, changed), changed)
    assert version == "jobs/j1@step-1"
    pushed = completions(stub, greedy(version, n_prompts=2))
    loaded = completions(stub, greedy(PERTURBED, n_prompts=2))
    base = completions(stub, greedy(MODEL, n_prompts=2))
    assert [c.policy_version for c in pushed] == [version] * 2
    assert [c.token_ids for c in pushed] == [c.token_ids for c in loaded]
    assert [c.token_ids for c in pushed] != [c.token_ids for c in base]

    original = load_file(tiny_model_dir / "model.safetensors")
    step2 = push(stub, full("jobs/j1", 2, original), original)
    assert [c.token_ids for c in completions(stub, greedy(step2, n_prompts=2))] == [
        c.token_ids for c in base
    ]
    cached = list(status(stub).cached_models)
    assert step2 in cached and version not in cached  # overwritten in place
    with pytest.raises(grpc.RpcError) as err:
        completions(stub, greedy(version))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_details(err.value).reason == "WRONG_STATE"  # the trainer's cue to push again
    with pytest.raises(grpc.RpcError) as err:  # the other replica never got it
        completions(replicas[1], greedy(step2))
    assert rpc_details(err.value).reason == "WRONG_STATE"


def adapter_push(
    folder: Path, policy: str, step: int
) -> tuple[PushHeader, dict[str, torch.Tensor]]:
    tensors = load_file(folder / "adapter_model.safetensors")
    config = (folder / "adapter_config.json").read_text()
    return PushHeader(policy, step, MODEL, True, config, len(tensors)), tensors


def test_a_pushed_adapter_serves_like_the_same_adapter_from_the_registry(
    replicas: list[Stub], lora_dirs: list[Path]
) -> None:
    stub = replicas[0]
    first = push(stub, *adapter_push(lora_dirs[0], "jobs/j2", 1))
    out = completions(stub, greedy(adapter=first, n_prompts=2))
    assert [c.policy_version for c in out] == [first] * 2
    same = completions(stub, greedy(MODEL, LORA_R1, n_prompts=2))
    assert [c.token_ids for c in out] == [c.token_ids for c in same]
    second = push(stub, *adapter_push(lora_dirs[1], "jobs/j2", 2))
    out = completions(stub, greedy(MODEL, second, n_prompts=2))
    same = completions(stub, greedy(MODEL, LORA_R2, n_prompts=2))
    assert [c.token_ids for c in out] == [c.token_ids for c in same]
    with pytest.raises(grpc.RpcError) as err:  # step 1 was replaced by step 2
        completions(stub, greedy(MODEL, first))
    assert rpc_details(err.value).reason == "WRONG_STATE"


def test_bad_pushes_name_the_field(replicas: list[Stub], tiny_model_dir: Path) -> None:
    stub = replicas[0]
    weight = load_file(tiny_model_dir / "model.safetensors")["model.norm.weight"]

    def refused(messages: list[rollout_pb2.PushWeightsRequest]) -> list[str]:
        with pytest.raises(grpc.RpcError) as err:
            stub.PushWeights(iter(messages), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return rpc_details(err.value).fields

    def stream(header: PushHeader, *pieces: TensorPiece) -> list[rollout_pb2.PushWeightsRequest]:
        return list(push_to_proto(header, pieces))

    norm = list(tensor_pieces("model.norm.weight", weight))
    assert refused(stream(full("jobs/j3", 1, {}), *norm)[1:]) == ["header"]
    assert refused(stream(full("jobs/j3", 0, {"x": weight}), *norm)) == ["header.step"]
    assert refused(stream(full("jobs/j3", 1, {"a": weight, "b": weight}), *norm)) == [
        "header.tensor_count"
    ]
    wrong = list(tensor_pieces("model.norm.weight", torch.ones(3)))
    assert refused(stream(full("jobs/j3", 1, {"x": weight}), *wrong)) == ["chunk.shape"]
    unknown = list(tensor_pieces("model.nope", weight))
    assert refused(stream(full("jobs/j3", 1, {"x": weight}), *unknown)) == ["chunk.name"]
    cut = [TensorPiece(p.name, p.dtype, p.shape, p.offset, p.data[:-4]) for p in norm]
    assert refused(stream(full("jobs/j3", 1, {"x": weight}), *cut)) == ["chunk.data"]
    lora = PushHeader("jobs/j3", 1, MODEL, True, "not json", 1)
    assert refused(stream(lora, *norm)) == ["header.adapter_config_json"]
    assert list(status(stub).cached_models) == []  # nothing refused was kept


def pushing(pusher: Any, model: Any, job: str, keep: bool = False) -> Any:
    """A PushPublisher of `model`'s full weights that pushes at every step (never uploads)."""
    from services.trainer.rl.weight_sync import PushPublisher, actor_payload

    async def no_upload(folder: Path, request_id: str) -> str:
        raise AssertionError("a push step made a registry revision")

    return PushPublisher(
        pusher,
        no_upload,
        lambda policy, step, copy: actor_payload(model, False, policy, step, MODEL, copy=copy),
        MODEL,
        False,
        job,
        lambda step: False,
        keep_pushed=keep,
    )


async def test_the_trainer_pushes_to_every_replica_and_again_to_one_that_lacks_it(
    rollout_server: RolloutServerFactory, weights: LocalWeights, tiny_model_dir: Path
) -> None:
    """PushPublisher over an `ipv4:` list reaches both replicas; when the address later means a
    replica that never got the push (autoscaling, a restart), Generate there is WRONG_STATE and
    `serve` (what the controller calls on a lost policy) resolves again and pushes to it."""
    from services.trainer.rl.weight_sync import WeightPusher

    a, b, c = rollout_server(), rollout_server(), rollout_server()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pusher = WeightPusher(f"ipv4:{a.address},{b.address}", ())
    publisher = pushing(pusher, model, "j4")
    try:
        assert (await publisher.serve(None)).version == MODEL  # warmed up on both
        policy = await publisher.publish(Path("unused"), 1)
        assert (policy.version, policy.step) == ("jobs/j4@step-1", 1)
        for server in (a, b):
            with grpc.insecure_channel(server.address) as channel:
                (done,) = completions(Stub(channel), greedy(policy.version))
                assert done.policy_version == policy.version
        with grpc.insecure_channel(c.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                completions(Stub(channel), greedy(policy.version))
            assert rpc_details(err.value).reason == "WRONG_STATE"
            pusher.address = f"ipv4:{a.address},{b.address},{c.address}"  # DNS now says so
            assert await publisher.serve(policy) == policy
            (done,) = completions(Stub(channel), greedy(policy.version))
            assert done.policy_version == policy.version
        pusher.address = f"ipv4:{a.address},{c.address}"  # scaled down: b is gone
        assert await publisher.serve(policy) == policy
        assert [r.address for r in pusher.replicas()] == [a.address, c.address]
    finally:
        await pusher.close()


async def test_a_lost_push_is_served_again_with_its_own_weights_when_the_actor_moved_on(
    rollout_server: RolloutServerFactory, tiny_model_dir: Path
) -> None:
    """One step ahead (max_policy_lag 1) the actor trains on while its last push is served: a
    replica that lost that push must get those weights again, not the actor's newer ones under
    the old name (`keep_pushed`). Without it, a synchronous job pushes the actor as it is."""
    from services.trainer.rl.weight_sync import WeightPusher

    a, b = rollout_server(), rollout_server()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def served(server: Any, version: str) -> tuple[list[int], list[float]]:
        """The greedy completion's tokens and their log-probs (weights change these)."""
        with grpc.insecure_channel(server.address) as channel:
            (done,) = completions(Stub(channel), greedy(version))
            assert done.policy_version == version
            return list(done.token_ids), list(done.logprobs)

    for keep in (True, False):
        pusher = WeightPusher(f"ipv4:{a.address}", ())
        publisher = pushing(pusher, model, f"j5{keep}", keep)
        try:
            policy = await publisher.publish(Path("unused"), 1)
            first, logprobs = served(a, policy.version)
            with torch.no_grad():  # the actor's next update, in place
                for weight in model.parameters():
                    weight.add_(torch.randn_like(weight))
            pusher.address = f"ipv4:{a.address},{b.address}"  # b never had it
            assert await publisher.serve(policy) == policy
            again, relogprobs = served(b, policy.version)
            same = again == first and relogprobs == pytest.approx(logprobs, abs=1e-5)
            assert same is keep
        finally:
            await pusher.close()
