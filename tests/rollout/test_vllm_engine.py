"""The vllm engine: output conversion and the engine's own logic against a fake `vllm` module
everywhere; real generation only on CUDA with vllm."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.rollout.domain import (
    Completion,
    FinishReason,
    LogprobsMode,
    PromptInput,
    SamplingSpec,
)
from services.rollout.engine import EngineConfig, EngineRequest, make_engine
from services.rollout.settings import RolloutSettings
from services.rollout.vllm_engine import VllmEngine, check_logprobs_mode, completion_from_output

RAW, SCALED = LogprobsMode.RAW, LogprobsMode.TEMPERATURE_SCALED


def test_completion_from_a_vllm_output() -> None:
    logprob = SimpleNamespace
    output = SimpleNamespace(
        index=1,
        text="ab",
        token_ids=[5, 7],
        logprobs=[{5: logprob(logprob=-0.5)}, {7: logprob(logprob=-1.25), 9: logprob(logprob=-3)}],
        finish_reason="length",
    )
    request = EngineRequest([[1, 2]], SamplingSpec(), None, return_prompt_ids=True)
    c = completion_from_output(output, 3, "models/m/revisions/r1", [1, 2], request)
    assert (c.prompt_index, c.sample_index, c.token_ids) == (3, 1, [5, 7])
    assert c.logprobs == [-0.5, -1.25] and c.finish_reason is FinishReason.LENGTH
    assert c.prompt_token_ids == [1, 2] and c.policy_version == "models/m/revisions/r1"


@pytest.mark.parametrize(
    ("engine_mode", "mode", "sampling", "served"),
    [
        # raw_logprobs reports log_softmax(logits): RAW always, TEMPERATURE_SCALED only at T = 1.
        ("raw_logprobs", RAW, SamplingSpec(temperature=0.7, top_k=20), True),
        ("raw_logprobs", SCALED, SamplingSpec(temperature=1.0, top_p=0.9), True),
        ("raw_logprobs", SCALED, SamplingSpec(temperature=0.7), False),
        ("raw_logprobs", SCALED, SamplingSpec(temperature=0.7, skip_logprobs=True), True),
        # processed_logprobs reports log_softmax(top_k_top_p(logits / T)) (T = 1 for greedy):
        # the contract's numbers only when no top-k/top-p renormalises them.
        ("processed_logprobs", SCALED, SamplingSpec(temperature=0.7), True),
        ("processed_logprobs", SCALED, SamplingSpec(temperature=0.7, top_k=20), False),
        ("processed_logprobs", SCALED, SamplingSpec(temperature=0.7, top_p=0.9), False),
        ("processed_logprobs", RAW, SamplingSpec(temperature=0.7), False),
        ("processed_logprobs", RAW, SamplingSpec(temperature=1.0), True),
        ("processed_logprobs", RAW, SamplingSpec(temperature=0.0), True),
        ("processed_logprobs", RAW, SamplingSpec(temperature=0.0, top_k=5), False),
    ],
)
def test_which_logprobs_each_vllm_setting_serves(
    engine_mode: str, mode: LogprobsMode, sampling: SamplingSpec, served: bool
) -> None:
    request = EngineRequest([[1, 2]], sampling, None, logprobs_mode=mode)
    if served:
        check_logprobs_mode(engine_mode, request)
    else:
        with pytest.raises(FailedPrecondition, match="TLM_ROLLOUT_VLLM_LOGPROBS_MODE"):
            check_logprobs_mode(engine_mode, request)


def test_the_vllm_logprobs_setting_is_one_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RolloutSettings().vllm_logprobs_mode == "raw_logprobs"
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_LOGPROBS_MODE", "processed_logprobs")
    assert RolloutSettings().vllm_logprobs_mode == "processed_logprobs"
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_LOGPROBS_MODE", "raw_logits")  # not log-probs at all
    with pytest.raises(ValueError, match="vllm_logprobs_mode"):
        RolloutSettings()


def test_vllm_selected_where_it_does_not_import_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(SystemExit, match="TLM_ROLLOUT_ENGINE=vllm, but vLLM does not import"):
        make_engine("vllm", EngineConfig(device="cuda"))


def test_the_engine_table_builds_vllm_where_it_imports(fake_vllm: types.ModuleType) -> None:
    engine = make_engine("vllm", EngineConfig(device="cuda"))
    assert engine.name == "vllm" and engine.max_model_len == 0


def test_vllm_settings_reach_the_engine_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_MAX_LORA_RANK", "128")
    settings = RolloutSettings()
    assert (settings.vllm_tensor_parallel_size, settings.vllm_max_lora_rank) == (2, 128)
    assert settings.vllm_gpu_memory_utilization == 0.5
    monkeypatch.setenv("TLM_ROLLOUT_VLLM_MAX_LORA_RANK", "100")  # not a size vLLM has
    with pytest.raises(ValueError, match="expected one of 1, 8, 16"):
        RolloutSettings()


async def test_vllm_starts_with_the_configured_gpus_memory_share_and_lora_rank(
    fake_vllm: types.ModuleType, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = EngineConfig(
        device="cuda:2",
        vllm_tensor_parallel_size=2,
        vllm_gpu_memory_utilization=0.5,
        vllm_max_lora_rank=16,
    )
    engine = VllmEngine(config)
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
    args = engine._engine.args
    assert (args.tensor_parallel_size, args.gpu_memory_utilization) == (2, 0.5)
    assert (args.device_ids, args.max_lora_rank) == ([2, 3], 16)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 32, "lora_alpha": 64}')
    with pytest.raises(FailedPrecondition, match=r"rank 32 is above .* max_lora_rank 16"):
        await engine.load_adapter(adapter, "models/a/revisions/r1")
    await engine.close()


async def test_vllm_validation_errors_are_invalid_argument_naming_the_parameter(
    fake_vllm: types.ModuleType, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM 0.30's VLLMValidationError is a VLLMClientError, not a ValueError."""

    class VLLMValidationError(Exception):
        def __init__(self, message: str, *, parameter: str | None = None) -> None:
            super().__init__(message)
            self.parameter = parameter

    class StrictParams(FakeParams):
        def __init__(self, **kw: object) -> None:
            if kw["top_k"] == 7:
                raise VLLMValidationError("top_k must be -1 or at least 8", parameter="top_k")
            super().__init__(**kw)

    exceptions = types.ModuleType("vllm.exceptions")
    exceptions.VLLMValidationError = VLLMValidationError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    fake_vllm.SamplingParams = StrictParams  # type: ignore[attr-defined]
    engine = VllmEngine(EngineConfig(device="cuda"))
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
    with pytest.raises(InvalidArgument) as err:
        await asyncio.wait_for(_collect(engine, [[1, 2]], top_k=7), 5)
    assert [v.field for v in err.value.violations] == ["sampling.top_k"]
    assert engine.running == 0
    await engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_vllm_generates_with_raw_logprobs(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    engine = make_engine("vllm", EngineConfig(device="cuda"))
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "float32", None)
    try:
        ids = engine.encode([PromptInput(text="The red cat")])
        request = EngineRequest(ids, SamplingSpec(n=2, max_tokens=8, seed=1), None)
        out = [c async for batch in engine.generate(request) for c in batch]
        again = [c async for batch in engine.generate(request) for c in batch]
        assert len(out) == 2 and all(len(c.logprobs) == len(c.token_ids) for c in out)
        assert [c.token_ids for c in out] == [c.token_ids for c in again]
    finally:
        await engine.close()


# A fake `vllm` module: enough of AsyncLLM's surface to run the engine's own logic on CPU.


@dataclasses.dataclass
class FakeArgs:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1
    logprobs_mode: str = "raw_logprobs"
    worker_extension_cls: str = ""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    device_ids: list[int] | None = None


@dataclasses.dataclass
class OldFakeArgs:  # a vLLM release without logprobs_mode
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 1


class FakeParams:
    def __init__(self, **kw: object) -> None:
        if kw["n"] != 1 and kw["temperature"] == 0:
            raise ValueError("n must be 1 when using greedy sampling")
        self.kw = kw


class FakeLLM:
    fail_on: ClassVar[set[str]] = set()
    release = asyncio.Event()

    def __init__(self, args: FakeArgs) -> None:
        self.args = args
        self.model_config = SimpleNamespace(max_model_len=args.max_model_len or 512)
        self.stopped = False

    @classmethod
    def from_engine_args(cls, args: FakeArgs) -> FakeLLM:
        if args.model in cls.fail_on:
            raise RuntimeError("CUDA out of memory")
        return cls(args)

    def shutdown(self) -> None:
        self.stopped = True

    async def generate(self, prompt, params, request_id, lora_request):  # type: ignore[no-untyped-def]
        if len(prompt["prompt_token_ids"]) > 3:
            raise ValueError("the prompt is longer than the maximum model length")
        if prompt["prompt_token_ids"] == [0]:
            await FakeLLM.release.wait()
        step = SimpleNamespace(logprob=-1.0)
        output = SimpleNamespace(
            index=0, text="x", token_ids=[5], logprobs=[{5: step}], finish_reason="length"
        )
        yield SimpleNamespace(outputs=[output])


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = FakeArgs  # type: ignore[attr-defined]
    vllm.AsyncLLMEngine = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = FakeParams  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = SimpleNamespace(FINAL_ONLY=2)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(FakeLLM, "fail_on", set())
    monkeypatch.setattr(FakeLLM, "release", asyncio.Event())
    return vllm


async def _collect(engine: VllmEngine, ids: list[list[int]], **sampling: object) -> list[object]:
    request = EngineRequest(ids, SamplingSpec(**sampling), None)  # type: ignore[arg-type]
    return [c async for batch in engine.generate(request) for c in batch]


async def test_vllm_rejections_are_invalid_argument_and_free_the_slot(
    fake_vllm: types.ModuleType, tiny_model_dir: Path
) -> None:
    engine = VllmEngine(EngineConfig(device="cuda"))
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
    assert engine.max_model_len == 512  # read from the model_config attribute
    with pytest.raises(InvalidArgument) as err:  # SamplingParams refuses it
        await asyncio.wait_for(_collect(engine, [[1, 2]], n=2, temperature=0.0), 5)
    assert [v.field for v in err.value.violations] == ["sampling"]
    with pytest.raises(InvalidArgument) as err:  # the engine refuses the request
        await asyncio.wait_for(_collect(engine, [[1, 2], [1, 2, 3, 4]]), 5)
    assert [v.field for v in err.value.violations] == ["prompts[1]"]
    assert engine.running == 0 and len(await _collect(engine, [[1, 2]])) == 1
    await engine.close()


async def test_vllm_load_drains_and_restores_the_old_engine_on_failure(
    fake_vllm: types.ModuleType, tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = VllmEngine(EngineConfig(device="cuda"))
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", 256)
    first = engine._engine
    running = asyncio.create_task(_collect(engine, [[0]]))  # waits for FakeLLM.release
    await asyncio.sleep(0.01)
    FakeLLM.fail_on.add(str(tmp_path))
    load = asyncio.create_task(engine.load_model(tmp_path, "models/big/revisions/r1", "auto", None))
    await asyncio.sleep(0.1)
    with pytest.raises(Unavailable):  # draining: the load is not starved by new requests
        await _collect(engine, [[1, 2]])
    FakeLLM.release.set()
    assert len(await running) == 1
    with pytest.raises(RuntimeError, match="out of memory"):
        await load
    assert first.stopped and engine._engine is not first  # the old model runs again
    assert engine._engine.args.model == str(tiny_model_dir) and engine.max_model_len == 256
    assert engine._engine.args.max_loras == 2 and engine._engine.args.logprobs_mode
    assert len(await _collect(engine, [[1, 2]])) == 1
    await engine.close()


async def test_vllm_starts_with_the_configured_logprobs_mode_and_refuses_others(
    fake_vllm: types.ModuleType, tiny_model_dir: Path
) -> None:
    raw = VllmEngine(EngineConfig(device="cuda"))
    await raw.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
    assert raw._engine.args.logprobs_mode == "raw_logprobs"
    scaled = EngineRequest([[1, 2]], SamplingSpec(temperature=0.7), None, logprobs_mode=SCALED)
    with pytest.raises(FailedPrecondition, match="raw_logprobs"):
        await asyncio.wait_for(_gather(raw, scaled), 5)
    assert raw.running == 0  # refused before it took a slot
    await raw.close()
    processed = VllmEngine(EngineConfig(device="cuda", vllm_logprobs_mode="processed_logprobs"))
    await processed.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
    assert processed._engine.args.logprobs_mode == "processed_logprobs"
    (c,) = await asyncio.wait_for(_gather(processed, scaled), 5)
    assert c.logprobs == [-1.0]  # what vLLM reported, unchanged
    with pytest.raises(FailedPrecondition, match="processed_logprobs"):
        await asyncio.wait_for(_collect(processed, [[1, 2]], temperature=0.7), 5)  # RAW
    await processed.close()


async def _gather(engine: VllmEngine, request: EngineRequest) -> list[Completion]:
    return [c async for batch in engine.generate(request) for c in batch]


async def test_vllm_without_raw_logprobs_is_refused(
    fake_vllm: types.ModuleType, tiny_model_dir: Path
) -> None:
    fake_vllm.AsyncEngineArgs = OldFakeArgs  # type: ignore[attr-defined]
    engine = VllmEngine(EngineConfig(device="cuda"))
    with pytest.raises(FailedPrecondition, match="logprobs_mode"):
        await engine.load_model(tiny_model_dir, "models/tiny/revisions/r1", "auto", None)
