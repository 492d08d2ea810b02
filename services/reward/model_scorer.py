"""The model scorer: a sequence-classification reward model from the registry, its raw logit
(num_labels 1) as the value. Revisions are downloaded once (ModelCache), loaded once and kept
in a small LRU; forward passes run in batches in a worker thread, off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from services.common.errors import FailedPrecondition, TlmError
from services.reward.domain import ModelIncompatible, Outcome, Sample
from services.reward.engine import ScoreContext
from services.reward.registry_port import RegistryPort
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward")


def reward_model_problem(config: Any) -> str | None:
    """Why a transformers config cannot serve as a reward model, or None.

    >>> from types import SimpleNamespace as C
    >>> reward_model_problem(C(architectures=["Qwen2ForSequenceClassification"], num_labels=1))
    >>> reward_model_problem(C(architectures=["Qwen2ForCausalLM"], num_labels=2))[:28]
    'not a sequence classifier (a'
    >>> reward_model_problem(C(architectures=["BertForSequenceClassification"], num_labels=2))
    'num_labels is 2; a reward model has one output (num_labels 1)'
    """
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        why = "a reward model is a *ForSequenceClassification"
        return f"not a sequence classifier (architectures {archs}); {why}"
    if config.num_labels != 1:
        return f"num_labels is {config.num_labels}; a reward model has one output (num_labels 1)"
    return None


def render_text(tokenizer: Any, sample: Sample, chat: bool) -> str:
    """What the reward model reads: prompt and completion as a chat (user, assistant turns)
    rendered by the tokenizer's template when `chat` and it has one; else prompt + completion
    concatenated, as TRL's reward trainer builds non-conversational examples."""
    if chat and getattr(tokenizer, "chat_template", None):
        turns = [{"role": r, "content": c} for r, c in sample.prompt.messages]
        if not turns and sample.prompt.text:
            turns = [{"role": "user", "content": sample.prompt.text}]
        turns.append({"role": "assistant", "content": sample.completion})
        return str(tokenizer.apply_chat_template(turns, tokenize=False))
    return sample.prompt.as_text() + sample.completion


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    lock: threading.Lock

    def logits(self, texts: Sequence[str], max_length: int, batch_size: int) -> list[float]:
        """One raw logit per text, `batch_size` texts per forward pass (blocking)."""
        import torch

        out: list[float] = []
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(self.model.device)
                logits = self.model(**batch).logits  # (B, 1)
                out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out


def load_reward_model(folder: Path, device: str) -> LoadedModel:
    """Load and check a downloaded revision (blocking); ModelIncompatible if not a reward model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    problem = reward_model_problem(AutoConfig.from_pretrained(folder))
    if problem:
        raise ModelIncompatible(problem)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Keep the end of long inputs: the completion is what is scored (and where decoder
    # classifiers read their score, at the last token).
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # batched decoder classifiers need it
    return LoadedModel(model, tokenizer, threading.Lock())


def check_folder(folder: Path) -> str | None:
    """Why a downloaded revision is not a reward model, or None (blocking: reads config.json)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        return f"not a transformers model: {exc}"
    return reward_model_problem(config)


class ModelScorerAdapter:
    """Scores with registry reward models; `registry` is set once the server knows its address."""

    def __init__(self, device: str, slots: int) -> None:
        self.device = device
        self.slots = slots
        self.registry: RegistryPort | None = None
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def problem(self, name: str, team: str) -> str | None:
        """Why `name` cannot serve as a reward model for `team` (missing, wrong kind), or None."""
        try:
            folder = await self._folder(name, team)
        except TlmError as exc:
            return exc.message
        return await asyncio.to_thread(check_folder, folder)

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        cfg = scorer.model
        try:
            model = await self._model(cfg.model_revision, ctx.team)
        except TlmError as exc:
            return [Outcome.error(f"{cfg.model_revision}: {exc.message}")] * len(samples)
        texts = [render_text(model.tokenizer, s, cfg.apply_chat_template) for s in samples]
        values = await asyncio.to_thread(model.logits, texts, cfg.max_length, cfg.batch_size)
        return [Outcome.ok(v) for v in values]

    async def _folder(self, name: str, team: str) -> Path:
        if self.registry is None:
            raise FailedPrecondition("no registry configured for the reward service")
        _revision, folder = await self.registry.model_folder(name, team)
        return folder

    async def _model(self, name: str, team: str) -> LoadedModel:
        folder = await self._folder(name, team)
        key = str(folder)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            model = await asyncio.to_thread(load_reward_model, folder, self.device)
            log.info("reward_model_loaded", revision=name, team=team, device=self.device)
            self._loaded[key] = model
            while len(self._loaded) > self.slots:
                self._loaded.popitem(last=False)
            return model
