"""The transformers engine on a local folder: seeds, log-probs, stops, batching, adapters."""

from __future__ import annotations

import asyncio
import gc
import warnings
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.rollout import decoding, transformers_engine
from services.rollout.domain import (
    Completion,
    FinishReason,
    LogprobsMode,
    PromptInput,
    SamplingSpec,
)
from services.rollout.engine import EngineConfig, EngineRequest
from services.rollout.transformers_engine import TransformersEngine
from tests.waiting import until

VERSION = "models/tiny/revisions/r1"


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    engine = TransformersEngine(EngineConfig())
    await engine.load_model(tiny_model_dir, VERSION, "auto", None)
    yield engine
    await engine.close()


async def run(
    engine: TransformersEngine,
    texts: list[str],
    adapter: str | None = None,
    logprobs_mode: LogprobsMode = LogprobsMode.RAW,
    **sampling: object,
) -> list[Completion]:
    ids = engine.encode([PromptInput(text=t) for t in texts])
    spec = SamplingSpec(**sampling)  # type: ignore[arg-type]
    request = EngineRequest(ids, spec, adapter, logprobs_mode=logprobs_mode)
    out = [c async for batch in engine.generate(request) for c in batch]
    return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))


def tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.token_ids for c in completions]


async def test_same_seed_same_output_even_when_batched(engine: TransformersEngine) -> None:
    alone = await run(engine, ["The red cat", "What is 2 + 3?"], n=3, max_tokens=12, seed=5)
    # The same request batched together with a different one gives the same tokens.
    together = await asyncio.gather(
        run(engine, ["The red cat", "What is 2 + 3?"], n=3, max_tokens=12, seed=5),
        run(engine, ["Anna likes the big dog and more words"], n=2, max_tokens=20, seed=9),
    )
    assert tokens(together[0]) == tokens(alone)
    other_seed = await run(engine, ["The red cat", "What is 2 + 3?"], n=3, max_tokens=12, seed=6)
    assert tokens(other_seed) != tokens(alone)
    # n samples of one prompt differ from each other (each has its own generator).
    assert len({tuple(t) for t in tokens(alone)[:3]}) == 3
    assert [(c.prompt_index, c.sample_index) for c in alone] == [
        (p, s) for p in range(2) for s in range(3)
    ]
    assert all(c.policy_version == VERSION for c in alone)


def assert_full_forward_logprobs(
    completions: list[Completion], prompts: list[list[int]], model_dir: Path, temperature: float
) -> None:
    """Each completion's log-probs equal log_softmax(logits / temperature) of one full pass."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for c in completions:
        prompt = prompts[c.prompt_index]
        full = torch.tensor([prompt + c.token_ids])  # (1, P + T)
        with torch.no_grad():
            logits = model(input_ids=full).logits[0].float()  # (P + T, V)
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (P + T, V)
        steps = torch.arange(len(c.token_ids)) + len(prompt) - 1  # positions predicting tokens
        expected = logp[steps, torch.tensor(c.token_ids)]
        assert len(c.logprobs) == len(c.token_ids) > 0
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # generates 40 tokens for 9 rows
async def test_seeded_tokens_past_a_draw_block_do_not_depend_on_batch_mates(
    engine: TransformersEngine,
) -> None:
    """Uniforms are drawn DRAW_BLOCK at a time per row: a row's tokens after the first block,
    and after a batch mate ends mid-block (the batch is pruned), are still its seed's alone."""
    long = decoding.DRAW_BLOCK + 8
    alone = await run(engine, ["The red cat"], n=6, max_tokens=long, seed=11, temperature=0.7)
    together = await asyncio.gather(
        run(engine, ["The red cat"], n=6, max_tokens=long, seed=11, temperature=0.7),
        run(engine, ["Anna likes the big dog"], n=3, max_tokens=5, seed=4),
    )
    assert tokens(together[0]) == tokens(alone)
    lengths = sorted(len(t) for t in tokens(alone))
    assert lengths[0] < decoding.DRAW_BLOCK < lengths[-1]  # rows end mid-block and go past it
    # One draw per token from the row's generator: the stream a block of draws reproduces.
    generator = torch.Generator().manual_seed(3)
    one_by_one = torch.cat([torch.rand(1, generator=generator) for _ in range(2 * long)])
    generator.manual_seed(3)
    blocks = torch.cat([torch.rand(decoding.DRAW_BLOCK, generator=generator) for _ in range(3)])
    assert torch.equal(blocks[: 2 * long], one_by_one)


async def test_logprobs_equal_a_full_forward_pass(
    engine: TransformersEngine, tiny_model_dir: Path
) -> None:
    # Temperature and filters change what is sampled, never the reported (raw) log-probs.
    texts = ["The red cat", "What is 12 * 7? <think>"]
    out = await run(engine, texts, n=2, max_tokens=16, seed=1, temperature=0.7, top_k=20, top_p=0.9)
    prompts = engine.encode([PromptInput(text=t) for t in texts])
    assert_full_forward_logprobs(out, prompts, tiny_model_dir, 1.0)


async def test_temperature_scaled_logprobs_per_request_in_one_batch(
    engine: TransformersEngine, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A raw and a temperature-scaled request decode in one batch (same weights, submitted
    # together); each reports its own convention, and the sampled tokens do not depend on it.
    batches: list[int] = []
    real_decode = transformers_engine.decode

    def counting_decode(rows: list, ctx: object) -> None:  # type: ignore[type-arg]
        batches.append(len(rows))
        real_decode(rows, ctx)  # type: ignore[arg-type]

    monkeypatch.setattr(transformers_engine, "decode", counting_decode)
    texts = ["The red cat", "What is 12 * 7? <think>"]
    sampling = {"n": 2, "max_tokens": 16, "seed": 1, "temperature": 0.7, "top_k": 20}
    raw, scaled = await asyncio.gather(
        run(engine, texts, **sampling),  # type: ignore[arg-type]
        run(engine, texts, logprobs_mode=LogprobsMode.TEMPERATURE_SCALED, **sampling),  # type: ignore[arg-type]
    )
    assert batches == [8]  # both requests' 2 prompts x 2 samples in one batch
    assert tokens(scaled) == tokens(raw)
    prompts = engine.encode([PromptInput(text=t) for t in texts])
    assert_full_forward_logprobs(raw, prompts, tiny_model_dir, 1.0)
    assert_full_forward_logprobs(scaled, prompts, tiny_model_dir, 0.7)
    gap = [
        abs(a - b)
        for r, s in zip(raw, scaled, strict=True)
        for a, b in zip(r.logprobs, s.logprobs, strict=True)
    ]
    assert max(gap) > 1e-2  # the two conventions differ at 0.7: the test can tell them apart


async def test_greedy_matches_hf_generate(engine: TransformersEngine, tiny_model_dir: Path) -> None:
    out = await run(engine, ["The red cat"], max_tokens=10, temperature=0.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = torch.tensor(engine.encode([PromptInput(text="The red cat")]))
    ref = model.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1] :]
    eos = {1, 3}  # <|endoftext|>, <|im_end|>
    expected = ref.tolist()
    for i, t in enumerate(expected):
        if t in eos:
            expected = expected[: i + 1]
            break
    assert out[0].token_ids == expected


async def test_length_stop_strings_and_skip_logprobs(engine: TransformersEngine) -> None:
    (free,) = await run(engine, ["The red cat"], max_tokens=24, seed=3)
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 24
    stop = free.text[5:7]  # a string known to appear in the free-running text
    (stopped,) = await run(engine, ["The red cat"], max_tokens=24, seed=3, stop=(stop,))
    assert stopped.finish_reason is FinishReason.STOP
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    (bare,) = await run(engine, ["The red cat"], max_tokens=4, seed=3, skip_logprobs=True)
    assert bare.logprobs == [] and bare.token_ids == free.token_ids[:4]


async def test_chat_prompts_use_the_template(engine: TransformersEngine) -> None:
    (ids,) = engine.encode([PromptInput(messages=(("user", "hi"),))])
    tokenizer = engine._model().tokenizer
    text = str(tokenizer.decode(ids))
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("assistant\n")


async def test_adapters_change_outputs_and_versions(
    engine: TransformersEngine, lora_dirs: list[Path]
) -> None:
    base = await run(engine, ["The red cat"], n=2, max_tokens=12, seed=4)
    await engine.load_adapter(lora_dirs[0], "models/lora/revisions/r1")
    await engine.load_adapter(lora_dirs[1], "models/lora/revisions/r2")
    one = await run(engine, ["The red cat"], "models/lora/revisions/r1", n=2, max_tokens=12, seed=4)
    two = await run(engine, ["The red cat"], "models/lora/revisions/r2", n=2, max_tokens=12, seed=4)
    assert len({str(tokens(base)), str(tokens(one)), str(tokens(two))}) == 3
    assert {c.policy_version for c in two} == {"models/lora/revisions/r2"}
    # Unloading r1 leaves r2 and the base untouched.
    await engine.unload_adapter("models/lora/revisions/r1")
    assert tokens(await run(engine, ["The red cat"], n=2, max_tokens=12, seed=4)) == tokens(base)
    again = await run(
        engine, ["The red cat"], "models/lora/revisions/r2", n=2, max_tokens=12, seed=4
    )
    assert tokens(again) == tokens(two)


async def test_a_seeded_request_ignores_a_top_k_batch_mate(engine: TransformersEngine) -> None:
    # With a top-k row in the batch, an unfiltered row must still draw in vocabulary order.
    alone = await run(engine, ["The red cat"], n=4, max_tokens=16, seed=21)
    together = await asyncio.gather(
        run(engine, ["The red cat"], n=4, max_tokens=16, seed=21),
        run(engine, ["Anna likes the big dog"], n=2, max_tokens=16, seed=9, top_k=50),
    )
    assert tokens(together[0]) == tokens(alone)


async def test_an_idle_retired_adapter_is_deleted_at_once(
    engine: TransformersEngine, lora_dirs: list[Path]
) -> None:
    await engine.load_adapter(lora_dirs[0], "models/lora/revisions/r1")
    await run(engine, ["The red cat"], "models/lora/revisions/r1", max_tokens=4, seed=1)
    model = engine._model()
    name = model.adapters["models/lora/revisions/r1"].internal_name
    assert name in model._peft.peft_config
    await engine.unload_adapter("models/lora/revisions/r1")
    # Deleted now, or as the finished batch's thread returns; not kept until a later forward.
    await until(lambda: name not in model._peft.peft_config, timeout=5, what="deleted")
    assert name not in model._peft.peft_config


async def test_retiring_the_active_adapter_warns_nothing(
    engine: TransformersEngine, lora_dirs: list[Path]
) -> None:
    """peft warns whenever the active adapter is deleted, which a LoRA job's every policy push
    did on the replica serving it: the engine moves off the adapter first, and the other
    adapter still decodes as before."""
    r1, r2 = "models/lora/revisions/r1", "models/lora/revisions/r2"
    await engine.load_adapter(lora_dirs[0], r1)
    await engine.load_adapter(lora_dirs[1], r2)
    two = await run(engine, ["The red cat"], r2, n=2, max_tokens=12, seed=4)
    await run(engine, ["The red cat"], r1, max_tokens=4, seed=1)  # r1 is the active one
    model = engine._model()
    name = model.adapters[r1].internal_name
    with warnings.catch_warnings(record=True) as caught:  # the decode thread's too
        warnings.simplefilter("always")
        await engine.unload_adapter(r1)
        await until(lambda: name not in model._peft.peft_config, timeout=5, what="deleted")
        again = await run(engine, ["The red cat"], r2, n=2, max_tokens=12, seed=4)
    assert name not in model._peft.peft_config
    assert [str(w.message) for w in caught if "was active" in str(w.message)] == []
    assert tokens(again) == tokens(two)


@pytest.mark.slow  # loads models
async def test_a_replaced_model_is_freed_and_dropped_before_the_load(
    engine: TransformersEngine, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run(engine, ["The red cat"], n=2, max_tokens=4, seed=1)
    old = weakref.ref(engine._model())
    seen: list[object] = []
    real = transformers_engine.LoadedModel

    def loaded_model(*args: object) -> object:
        seen.append(engine._models.get(VERSION))  # what the slot still held while loading
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(transformers_engine, "LoadedModel", loaded_model)
    for _ in range(200):  # the finished batch's bookkeeping ends just after its results arrive
        if engine._idle():
            break
        await asyncio.sleep(0.01)
    await engine.load_model(tiny_model_dir, "models/tiny/revisions/r2", "auto", None, VERSION)
    gc.collect()
    assert seen == [None] and old() is None
    assert {c.policy_version for c in await run(engine, ["hi"], max_tokens=2)} == {
        "models/tiny/revisions/r2"
    }
