"""The vllm engine: output conversion everywhere; real generation only on CUDA with vllm."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.rollout.domain import FinishReason, PromptInput, SamplingSpec
from services.rollout.engine import EngineConfig, EngineRequest, make_engine
from services.rollout.vllm_engine import completion_from_output


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


def test_the_engine_table_builds_vllm_without_importing_it() -> None:
    engine = make_engine("vllm", EngineConfig(device="cuda"))
    assert engine.name == "vllm" and engine.max_model_len == 0


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
