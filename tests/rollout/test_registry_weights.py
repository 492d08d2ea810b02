"""Rollout and registry together, as `tlm up` runs them: weights and adapters by revision."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

TEAM_A = (("authorization", "Bearer key-team-a"),)
TEAM_B = (("authorization", "Bearer key-team-b"),)


async def test_load_model_and_adapter_from_the_registry(
    secured: ServerThread, tiny_model_dir: Path, lora_dirs: list[Path]
) -> None:
    registry = RegistryClient(secured.address, api_key="key-team-a")
    try:
        for model_id in ("rollout-tiny", "rollout-lora"):
            await registry.stub.CreateModel(
                registry_pb2.CreateModelRequest(model_id=model_id), metadata=registry.metadata()
            )
        base = await registry.upload_model_revision("models/rollout-tiny", tiny_model_dir)
        lineage = registry_pb2.Lineage(base_model_revision=base.name)
        adapter = await registry.upload_model_revision(
            "models/rollout-lora",
            lora_dirs[0],
            format=registry_pb2.MODEL_FORMAT_LORA_ADAPTER,
            lineage=lineage,
        )
    finally:
        await registry.close()

    channel = grpc.aio.insecure_channel(secured.address)
    rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
    loaded = await rollout.LoadModel(
        rollout_pb2.LoadModelRequest(model_revision="models/rollout-tiny/revisions/latest"),
        metadata=TEAM_A,
    )
    assert loaded.policy_version == base.name
    lora = rollout_pb2.LoadAdapterRequest(adapter_revision=adapter.name)
    assert (await rollout.LoadAdapter(lora, metadata=TEAM_A)).policy_version == adapter.name
    request = rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text="The red cat")],
        sampling=rollout_pb2.SamplingParams(n=2, max_tokens=6, seed=1),
        adapter_revision=adapter.name,
    )
    completions = [
        c async for r in rollout.Generate(request, metadata=TEAM_A) for c in r.completions
    ]
    assert {c.policy_version for c in completions} == {adapter.name}

    # Another team sees no model here, and cannot generate with team-a's weights.
    status = await rollout.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), metadata=TEAM_B)
    assert status.model_revision == "" and not status.adapters
    with pytest.raises(grpc.RpcError) as err:  # the registry shows team-b no such adapter
        _ = [r async for r in rollout.Generate(request, metadata=TEAM_B)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    named = rollout_pb2.GenerateRequest()
    named.CopyFrom(request)
    named.adapter_revision, named.model_revision = "", base.name
    with pytest.raises(grpc.RpcError) as err:  # nor team-a's model, though it is in the cache
        _ = [r async for r in rollout.Generate(named, metadata=TEAM_B)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        unknown = rollout_pb2.LoadModelRequest(model_revision="models/rollout-tiny/revisions/r99")
        await rollout.LoadModel(unknown, metadata=TEAM_A)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close(None)
