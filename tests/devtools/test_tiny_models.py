from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from services.devtools.tiny_models import (
    KINDS,
    SIZES,
    build_tiny_model,
    build_tokenizer,
    cached_tiny_model,
)

# Builds and loads models (transformers alone takes seconds to import).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("lm"), "test", "causal-lm")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("rm"), "test", "reward-model")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_test_size_param_count(lm_dir: Path, rm_dir: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert 50_000 <= _n_params(lm) <= 200_000
    assert 50_000 <= _n_params(rm) <= 200_000


def test_bench_size_param_count(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, "bench", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 3_000_000 <= _n_params(model) <= 4_000_000
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(path)) == 2048


@pytest.mark.parametrize("kind", KINDS)
def test_builds_are_byte_identical(tmp_path: Path, kind: str) -> None:
    a = build_tiny_model(tmp_path / "a", "test", kind, seed=3)
    b = build_tiny_model(tmp_path / "b", "test", kind, seed=3)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_model(tmp_path / "c", "test", kind, seed=4)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path, "test")
    assert torch.equal(torch.rand(3), expected)


def test_saved_files(lm_dir: Path, rm_dir: Path) -> None:
    common = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert common | {"generation_config.json"} <= {p.name for p in lm_dir.iterdir()}
    assert common <= {p.name for p in rm_dir.iterdir()}


def test_tokenizer_round_trips(lm_dir: Path) -> None:
    loaded = AutoTokenizer.from_pretrained(lm_dir)
    built = build_tokenizer("test")
    text = "What is 12 + 7? <think>12 + 7 = 19</think><answer>19</answer> héllo 🙂<|im_end|>"
    assert loaded(text).input_ids == built(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == text
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|endoftext|>"
    assert loaded.pad_token_id != loaded.eos_token_id
    # Special tokens must stay single ids, not be split into bytes.
    assert len(loaded("<|im_start|><|im_end|>").input_ids) == 2


def test_chat_template(lm_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(lm_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(messages, tokenize=False)
    assert isinstance(no_gen, str)
    assert not no_gen.endswith("<|im_start|>assistant\n")


def test_causal_lm_generates(lm_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id
    batch = tok(["Hello there", "What is 12 + 7?"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=8, min_new_tokens=8)
    new = out[:, batch.input_ids.shape[1] :]
    assert new.shape == (2, 8)
    assert int(new.max()) < model.config.vocab_size


def test_reward_model_scores_padded_batch(rm_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["a short one", "a much longer answer with <answer>42</answer> in it"]
    with torch.no_grad():
        for side in ("left", "right"):
            tok.padding_side = side
            batch = tok(texts, return_tensors="pt", padding=True)
            logits = model(**batch).logits
            assert logits.shape == (2, 1)
            # Padding must not change a sequence's score.
            alone = model(**tok(texts[:1], return_tensors="pt")).logits
            torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("size", "kind"), [("huge", "causal-lm"), ("test", "seq2seq"), ("", "reward-model")]
)
def test_bad_size_or_kind(tmp_path: Path, size: str, kind: str) -> None:
    allowed = "causal-lm" if size in SIZES else "bench"
    with pytest.raises(ValueError, match=allowed):
        build_tiny_model(tmp_path, size, kind)
    with pytest.raises(ValueError, match=allowed):
        cached_tiny_model(size, kind, cache_dir=tmp_path)
    if kind in KINDS:
        with pytest.raises(ValueError, match="bench"):
            build_tokenizer(size)


def test_cache_is_built_once_and_shared(tmp_path: Path) -> None:
    # Concurrent callers race on the final rename; all must get the same complete folder.
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: cached_tiny_model(cache_dir=tmp_path), range(4)))
    assert len(paths) == 1
    path = paths.pop()
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny_model(cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLM_TINY_CACHE", str(tmp_path))
    path = cached_tiny_model("test", "reward-model")
    assert path.parent == tmp_path
    assert "reward-model" in path.name
