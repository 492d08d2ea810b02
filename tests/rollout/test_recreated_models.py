"""A revision name can come back with other weights: after a registry reset (an empty
database) numbering starts at r1 again while the rollout and its cache live on, and a model
deleted and uploaded again did the same before the registry kept counting. The rollout must
serve the new weights: its cache is keyed by content, and "adapter already loaded?" compares
content too. Each check is against a local forward pass of the weights that should serve."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from tests.conftest import API_KEYS, start_embedded
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

TEAM_A = (("authorization", "Bearer key-team-a"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Services of their own: these tests replace the rollout's model many times."""
    server = start_embedded(tmp_path_factory.mktemp("recreated"), api_keys=API_KEYS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_model_dir() -> Path:
    from services.devtools.tiny_models import cached_tiny_model

    return cached_tiny_model("test", "causal-lm", seed=1)  # same shapes, other weights


async def upload_fresh(
    address: str, model_id: str, folder: Path, **options: Any
) -> registry_pb2.ModelRevision:
    """Delete `models/{model_id}` if it exists, create it again, upload `folder` to it."""
    registry = RegistryClient(address, api_key="key-team-a")
    name = f"models/{model_id}"
    try:
        try:
            await registry.stub.DeleteModel(
                registry_pb2.DeleteModelRequest(name=name), metadata=registry.metadata()
            )
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
        await registry.stub.CreateModel(
            registry_pb2.CreateModelRequest(model_id=model_id), metadata=registry.metadata()
        )
        revision = await registry.upload_model_revision(name, folder, **options)
    finally:
        await registry.close()
    return revision


async def generate(
    rollout: rollout_pb2_grpc.RolloutServiceStub, adapter: str = ""
) -> rollout_pb2.Completion:
    request = rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text="The red cat")],
        sampling=rollout_pb2.SamplingParams(n=1, max_tokens=8, seed=3),
        adapter_revision=adapter,
        return_prompt_token_ids=True,
    )
    stream: Any = rollout.Generate(request, metadata=TEAM_A)  # aio: the stubs type it sync
    (completion,) = [c async for r in stream for c in r.completions]
    return completion


def forward_logprobs(model: torch.nn.Module, c: rollout_pb2.Completion) -> torch.Tensor:
    """log p(token) of each sampled token under `model`, from one forward pass."""
    prompt = list(c.prompt_token_ids)
    full = torch.tensor([prompt + list(c.token_ids)])  # (1, P + T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)  # (P+T, V)
    steps = torch.arange(len(c.token_ids)) + len(prompt) - 1  # positions predicting tokens
    return logp[steps, torch.tensor(list(c.token_ids))]


def served_by(folder: Path, c: rollout_pb2.Completion, adapter: Path | None = None) -> bool:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    expected = forward_logprobs(model, c)
    return bool(torch.allclose(torch.tensor(list(c.logprobs)), expected, atol=1e-4, rtol=0))


@pytest.mark.slow  # loads and generates with models
async def test_a_recreated_model_serves_its_new_weights(
    server: ServerThread, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        for folder in (tiny_model_dir, other_model_dir):
            revision = await upload_fresh(server.address, "recreated", folder)
            load = rollout_pb2.LoadModelRequest(model_revision=revision.name)
            await rollout.LoadModel(load, metadata=TEAM_A)
            completion = await generate(rollout)
            assert completion.policy_version == revision.name
            assert served_by(folder, completion)
    assert not served_by(tiny_model_dir, completion)


class ResettableRegistry:
    """A registry alone, replaced on its port by one with an empty database (a reset)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.resets = root, 0, 0
        self.thread = self._start()

    def _start(self) -> ServerThread:
        from services.registry.app import binding
        from services.registry.settings import RegistrySettings

        data_dir = self.root / f"registry-{self.resets}"
        settings = RegistrySettings(
            host="127.0.0.1", port=self.port, data_dir=data_dir, api_keys=API_KEYS
        )
        thread = ServerThread(lambda: [binding(settings)], settings).start()
        self.port = int(thread.address.rsplit(":", 1)[1])
        return thread

    @property
    def address(self) -> str:
        return self.thread.address

    async def reset(self) -> None:
        self.thread.stop()
        self.resets += 1
        self.thread = self._start()
        await self._until_reachable()

    async def _until_reachable(self) -> None:
        """Channels to one address share a connection; one that failed while the port was
        closed waits out its reconnect backoff (about a second) before it connects again."""
        client = RegistryClient(self.address, api_key="key-team-a")
        try:
            for _ in range(100):
                try:
                    await client.stub.ListModels(
                        registry_pb2.ListModelsRequest(), metadata=client.metadata()
                    )
                    return
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    await asyncio.sleep(0.1)
        finally:
            await client.close()
        raise AssertionError("the registry did not come back")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ResettableRegistry]:
    registry = ResettableRegistry(tmp_path)
    yield registry
    registry.thread.stop()


@pytest.fixture
def rollout_address(registry: ResettableRegistry, tmp_path: Path) -> Iterator[str]:
    """A rollout alone, on the registry above; it lives on across registry resets."""
    from services.rollout import app
    from services.rollout.settings import RolloutSettings

    settings = RolloutSettings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path / "rollout",
        api_keys=API_KEYS,
        service_api_key="key-service",
        registry_address=registry.address,
    )
    with ServerThread(lambda: [app.binding(settings)], settings) as server:
        yield server.address


@pytest.mark.slow  # generates with two models and an adapter
async def test_a_reused_name_serves_its_new_model_and_adapter(
    registry: ResettableRegistry,
    rollout_address: str,
    tiny_model_dir: Path,
    other_model_dir: Path,
    lora_dirs: list[Path],
) -> None:
    async with grpc.aio.insecure_channel(rollout_address) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        base, adapter = await _push_base_and_adapter(registry.address, tiny_model_dir, lora_dirs[0])
        await rollout.LoadModel(_load(base), metadata=TEAM_A)
        await rollout.LoadAdapter(_adapter(adapter), metadata=TEAM_A)
        assert served_by(tiny_model_dir, await generate(rollout, adapter), lora_dirs[0])

        await registry.reset()  # the same names now hold other weights
        reused, reused_adapter = await _push_base_and_adapter(
            registry.address, tiny_model_dir, lora_dirs[1]
        )
        assert (reused, reused_adapter) == (base, adapter)
        # The loaded base kept its content: a LoadAdapter of the new r1 swaps the adapter.
        await rollout.LoadAdapter(_adapter(adapter), metadata=TEAM_A)
        completion = await generate(rollout, adapter)
        assert completion.policy_version == adapter
        assert served_by(tiny_model_dir, completion, lora_dirs[1])
        assert not served_by(tiny_model_dir, completion, lora_dirs[0])

        await registry.reset()
        assert (await upload_fresh(registry.address, "base", other_model_dir)).name == base
        await rollout.LoadModel(_load(base), metadata=TEAM_A)
        completion = await generate(rollout)
    assert served_by(other_model_dir, completion)
    assert not served_by(tiny_model_dir, completion)


async def _push_base_and_adapter(
    address: str, base_dir: Path, adapter_dir: Path
) -> tuple[str, str]:
    """`base_dir` as models/base, `adapter_dir` on it as models/lora; their names."""
    base = await upload_fresh(address, "base", base_dir)
    lineage = registry_pb2.Lineage(base_model_revision=base.name)
    adapter = await upload_fresh(
        address, "lora", adapter_dir, format=registry_pb2.MODEL_FORMAT_LORA_ADAPTER, lineage=lineage
    )
    return base.name, adapter.name


def _load(name: str) -> rollout_pb2.LoadModelRequest:
    return rollout_pb2.LoadModelRequest(model_revision=name)


def _adapter(name: str) -> rollout_pb2.LoadAdapterRequest:
    return rollout_pb2.LoadAdapterRequest(adapter_revision=name)
