"""Tiny, deterministic Hugging Face models for tests, the demo and benchmarks.

Everything is built offline: a byte-level BPE tokenizer trained on a seeded synthetic corpus,
and randomly initialised Qwen2 models. The output folders are ordinary HF checkpoints, so the
services load them exactly like real models (``from_pretrained``, vLLM, TRL).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a model is built: a cached model needs neither (seconds)
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

# Bump when the corpus, tokenizer or architecture changes so stale caches are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class TinySize:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    corpus_lines: int


SIZES: dict[str, TinySize] = {
    # ~107K params: fast enough for unit tests that train or generate on CPU.
    "test": TinySize(512, 64, 2, 4, 2, 128, 512, corpus_lines=2_000),
    # ~3.5M params: big enough that benchmarks measure more than Python overhead.
    "bench": TinySize(2048, 256, 4, 4, 2, 704, 1024, corpus_lines=8_000),
}
KINDS = ("causal-lm", "reward-model")

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Listed first to the trainer, so they get ids 0..3 in every size.
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]

# Qwen2.5-style ChatML, without Qwen's default system prompt (it would waste tiny contexts).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_NAMES = ["Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea"]
_NOUNS = ["apple", "book", "cat", "coin", "dog", "egg", "pen", "stone", "tree", "box", "cup"]
_ADJS = ["red", "big", "small", "old", "new", "blue", "happy", "quiet", "fast", "green"]
_VERBS = ["sees", "likes", "finds", "moves", "holds", "counts", "paints", "opens", "reads"]
_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ne", "shi", "vu", "dra", "qin", "ol"]


def _check(size: str, kind: str = KINDS[0]) -> TinySize:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed: {sorted(SIZES)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {list(KINDS)}")
    return SIZES[size]


def _corpus(n_lines: int) -> list[str]:
    """Seeded English/arithmetic text in the shapes the services see (chat, think, answer)."""
    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        name, noun, adj, verb = (rng.choice(xs) for xs in (_NAMES, _NOUNS, _ADJS, _VERBS))
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = a + b if op == "+" else a - b if op == "-" else a * b
        # Made-up words give the larger vocab enough distinct merges to fill up.
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        lines.append(
            rng.choice(
                [
                    f"The {adj} {noun} {verb} the {word}. {name} has {a} {noun}s.",
                    f"What is {a} {op} {b}? <think>{a} {op} {b} = {result}</think>"
                    f"<answer>{result}</answer>",
                    f"{name} {verb} {b} {adj} {noun}s and {a} {word}s.",
                    f"<think>{name} thinks about the {word}.</think> <answer>{word}</answer>",
                ]
            )
        )
    return lines


def build_tokenizer(size: str = "test") -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    spec = _check(size)
    # transformers 5 loads every qwen2 checkpoint with Qwen2Tokenizer, which rebuilds the
    # normalizer/pre-tokenizer itself and ignores ours; so train with exactly Qwen's pipeline
    # (NFC, single digits, byte-level) and return a Qwen2Tokenizer, which is what loads back.
    qwen_pipeline = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = qwen_pipeline.normalizer
    tok.pre_tokenizer = qwen_pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the alphabet, so any text (emoji, other scripts) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.corpus_lines), trainer)
    bpe = json.loads(tok.to_str())["model"]
    # tokenizers needs (left, right) tuples, although transformers annotates list[str].
    merges: list[Any] = [tuple(pair) for pair in bpe["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def _config(spec: TinySize, tokenizer: PreTrainedTokenizerFast, kind: str) -> Qwen2Config:
    import torch
    from transformers import Qwen2Config

    eos_id = _token_id(tokenizer, EOS)
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        max_window_layers=spec.num_layers,
        tie_word_embeddings=True,
        # Like Qwen: no BOS token is prepended, the config points bos at <|endoftext|>.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=_token_id(tokenizer, PAD),
        dtype=torch.float32,
    )
    if kind == "reward-model":
        config.num_labels = 1  # one scalar score per sequence
    return config


def build_tiny_model(
    out_dir: str | Path, size: str = "test", kind: str = "causal-lm", seed: int = 0
) -> Path:
    """Write a randomly initialised model plus its tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    spec = _check(size, kind)
    out = Path(out_dir)
    tokenizer = build_tokenizer(size)
    config = _config(spec, tokenizer, kind)
    # fork_rng keeps the caller's global torch RNG untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel
        if kind == "causal-lm":
            model = Qwen2ForCausalLM(config)
            # Chat rollouts must stop at <|im_end|>; plain text at <|endoftext|> (as Qwen2.5).
            model.generation_config = GenerationConfig(
                bos_token_id=config.bos_token_id,
                eos_token_id=[config.eos_token_id, _token_id(tokenizer, IM_END)],
                pad_token_id=config.pad_token_id,
            )
        else:
            model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cached_tiny_model(
    size: str = "test", kind: str = "causal-lm", cache_dir: Path | None = None, seed: int = 0
) -> Path:
    """Build once per (version, size, kind, seed) and reuse; safe across concurrent processes."""
    _check(size, kind)
    root = Path(cache_dir or os.environ.get("TLM_TINY_CACHE") or Path.home() / ".cache/tlm/tiny")
    final = root / f"v{CACHE_VERSION}-{size}-{kind}-seed{seed}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: readers see either nothing or a complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        build_tiny_model(tmp, size, kind, seed)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
