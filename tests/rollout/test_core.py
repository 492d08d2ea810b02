"""Pushed adapters' scratch folders (services/rollout/core.py) on a real transformers engine over
the tiny model: whichever way the model they sit on leaves the cache (evicted, retired once a
newer step serves, superseded by a push, reloaded), their folders go with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.errors import FailedPrecondition
from services.rollout.core import RolloutCore, weight_bytes
from services.rollout.domain import PolicyVersionUnknown, PromptInput, SamplingSpec
from services.rollout.engine import EngineConfig, make_engine
from services.rollout.push import PushHeader
from services.rollout.weights import LocalWeights
from tests.rollout.conftest import MODEL, OTHER_MODEL

TEAM = "team-a"
FULL = "jobs/full"

pytestmark = pytest.mark.slow(reason="loads the tiny model several times per test")


class Rollout:
    """A core with its scratch folder in the test's tmp_path."""

    def __init__(self, weights: LocalWeights, tmp_path: Path, cache_bytes: int = 0) -> None:
        self.scratch = tmp_path / "scratch"
        engine = make_engine("transformers", EngineConfig(max_batch_prompts=1))
        self.core = RolloutCore(engine, weights, 4, cache_bytes, self.scratch)

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.scratch.iterdir())

    async def push_adapter(self, folder: Path, policy: str, step: int, base: str = MODEL) -> str:
        tensors = load_file(folder / "adapter_model.safetensors")
        config = (folder / "adapter_config.json").read_text()
        header = PushHeader(policy, step, base, True, config, len(tensors))
        return await self.core.push(header, tensors, TEAM)

    async def push_full(self, step: int, tensors: dict[str, torch.Tensor]) -> str:
        header = PushHeader(FULL, step, MODEL, False, "", len(tensors))
        return await self.core.push(header, tensors, TEAM)

    async def generate(self, model: str = "", adapter: str = "") -> None:
        async for _ in self._stream(model, adapter):
            pass

    @asynccontextmanager
    async def serving(self, model: str) -> AsyncIterator[None]:
        """A request on `model` that has its first completions and is not finished yet."""
        stream = self._stream(model, "")
        await anext(stream)
        try:
            yield
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def _stream(self, model: str, adapter: str) -> AsyncIterator[object]:
        prompts = [PromptInput(text=f"The red cat {i}") for i in range(2)]
        sampling = SamplingSpec(temperature=0.0, max_tokens=2)
        return self.core.generate(prompts, sampling, adapter, False, TEAM, model=model)

    async def close(self) -> None:
        await self.core.engine.close()


def folder(version: str) -> str:
    return f"{TEAM}--{version.replace('/', '--')}"


async def test_evicted_base_and_replaced_step_take_their_adapter_folders(
    local_weights: LocalWeights, lora_dirs: list[Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    one_model = weight_bytes(tiny_model_dir) * 3 // 2  # the budget holds one tiny model
    r = Rollout(local_weights, tmp_path, cache_bytes=one_model)
    try:
        await r.push_adapter(lora_dirs[0], "jobs/lora", 1)
        second = await r.push_adapter(lora_dirs[1], "jobs/lora", 2)
        assert r.folders() == [folder(second)]  # step 2 replaced step 1 on the base
        await r.generate(OTHER_MODEL)  # MODEL is evicted to make room
        assert r.folders() == []
    finally:
        await r.close()


async def test_a_retired_step_takes_its_adapter_folders(
    local_weights: LocalWeights, lora_dirs: list[Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    weights = load_file(tiny_model_dir / "model.safetensors")
    r = Rollout(local_weights, tmp_path)
    try:
        step1 = await r.push_full(1, weights)
        adapter = await r.push_adapter(lora_dirs[0], "jobs/on-pushed", 1, base=step1)
        async with r.serving(step1):
            await r.push_full(2, weights)  # step 1 is in use: loaded beside it
            assert r.folders() == [folder(adapter)]
        assert r.folders() == []  # step 1 retired as its last request ended
        with pytest.raises(FailedPrecondition):  # WRONG_STATE: the trainer pushes again
            await r.generate(adapter=adapter)
    finally:
        await r.close()


async def test_superseded_steps_take_their_adapter_folders(
    local_weights: LocalWeights, lora_dirs: list[Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 5 then step 3 (a trainer resumed from an earlier checkpoint): both idle, neither
    retired; step 6 takes over step 5's slot (the least recently used) and unloads step 3."""
    weights = load_file(tiny_model_dir / "model.safetensors")
    r = Rollout(local_weights, tmp_path)
    try:
        step5 = await r.push_full(5, weights)
        async with r.serving(step5):
            step3 = await r.push_full(3, weights)
        adapter = await r.push_adapter(lora_dirs[0], "jobs/on-3", 1, base=step3)
        assert r.folders() == [folder(adapter)]
        step6 = await r.push_full(6, weights)
        assert r.folders() == []
        assert [e.version for e in r.core.cache.entries(TEAM)] == [step6]
    finally:
        await r.close()


async def test_a_reloaded_base_takes_its_adapter_folders(
    local_weights: LocalWeights, lora_dirs: list[Path], tmp_path: Path
) -> None:
    r = Rollout(local_weights, tmp_path)
    try:
        adapter = await r.push_adapter(lora_dirs[0], "jobs/lora", 1)
        assert r.folders() == [folder(adapter)]
        await r.core.load_model(MODEL, TEAM, "float32", 0)  # reloaded in its slot
        assert r.folders() == []
        with pytest.raises(PolicyVersionUnknown):
            await r.generate(MODEL, adapter)
    finally:
        await r.close()
