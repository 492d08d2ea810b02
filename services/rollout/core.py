"""The rollout core: which weights are served (and for which team), request validation, and
the adapter table. Engine-agnostic; the servicer converts protobufs and calls this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from services.rollout.domain import (
    MAX_PROMPTS,
    AdapterIncompatible,
    Completion,
    EngineStatusInfo,
    LoadedAdapterInfo,
    NoModelLoaded,
    PromptInput,
    SamplingSpec,
    check_prompt_lengths,
    invalid,
)
from services.rollout.engine import Engine, EngineRequest
from services.rollout.weights import ResolvedRevision, RevisionNotFound, WeightFormat, WeightSource

log = structlog.get_logger("tlm.rollout")


@dataclass
class _Adapter:
    revision: str
    load_time: float
    names: set[str] = field(default_factory=set)  # every name it was loaded as


def adapter_model(revision: str) -> str:
    """'models/m/revisions/r2' -> 'models/m': one revision per adapter model is served."""
    return revision.split("/revisions/")[0]


class RolloutCore:
    def __init__(self, engine: Engine, weights: WeightSource, max_n: int) -> None:
        self.engine = engine
        self.weights = weights
        self.max_n = max_n
        self._team: str | None = None
        self._model = ""
        self._adapters: dict[str, _Adapter] = {}  # adapter model -> its loaded revision
        self._lock = asyncio.Lock()

    async def _fetch(self, name: str, team: str, field_path: str) -> ResolvedRevision:
        if not name:
            raise invalid(field_path, "is required, e.g. models/NAME/revisions/REV")
        try:
            return await self.weights.fetch(name, team)
        except RevisionNotFound as exc:
            raise invalid(field_path, f"unknown revision: {exc.message}") from exc

    def _require_model(self, team: str) -> str:
        if not self._model or self._team != team:
            raise NoModelLoaded("no model is loaded; call LoadModel first")
        return self._model

    # Weights -----------------------------------------------------------------------------------

    async def load_model(self, name: str, team: str, dtype: str, max_model_len: int) -> str:
        revision = await self._fetch(name, team, "model_revision")
        if revision.format is not WeightFormat.FULL:
            raise invalid("model_revision", "is a LoRA adapter; load it with LoadAdapter")
        if max_model_len < 0:
            raise invalid("max_model_len", "must be >= 0 (0: the model's own)")
        async with self._lock:
            await self.engine.load_model(
                revision.path, revision.name, dtype or "auto", max_model_len or None
            )
            self._team, self._model, self._adapters = team, revision.name, {}
        log.info("model_loaded", revision=revision.name, engine=self.engine.name)
        return revision.name

    async def load_adapter(self, name: str, team: str) -> str:
        model = self._require_model(team)
        revision = await self._fetch(name, team, "adapter_revision")
        if revision.format is not WeightFormat.LORA:
            raise invalid("adapter_revision", "is full weights; load it with LoadModel")
        base = revision.base_model_revision
        resolved_base = await self.weights.resolve(base, team) if base else ""
        if resolved_base != model:
            raise AdapterIncompatible(
                f"adapter {revision.name} was trained on {base or 'an unknown base'}, "
                f"but {model} is loaded",
                metadata={"adapter_revision": revision.name, "model_revision": model},
            )
        async with self._lock:
            self._require_model(team)  # a LoadModel may have won the lock meanwhile
            if self._model != model:
                raise AdapterIncompatible(f"the loaded model changed to {self._model}")
            await self.engine.load_adapter(revision.path, revision.name)
            key = adapter_model(revision.name)
            old = self._adapters.get(key)
            if old is None or old.revision != revision.name:
                self._adapters[key] = _Adapter(revision.name, time.time())
            self._adapters[key].names |= {name, revision.name, key}
            if old is not None and old.revision != revision.name:
                await self.engine.unload_adapter(old.revision)  # running requests finish first
        log.info("adapter_loaded", revision=revision.name, replaced=old.revision if old else None)
        return revision.name

    def _find_adapter(self, name: str) -> tuple[str, _Adapter]:
        for key, adapter in self._adapters.items():
            if name in adapter.names:
                return key, adapter
        raise invalid("adapter_revision", f"{name} is not loaded; call LoadAdapter first")

    async def unload_adapter(self, name: str, team: str) -> None:
        self._require_model(team)
        async with self._lock:
            key, adapter = self._find_adapter(name)
            del self._adapters[key]
            await self.engine.unload_adapter(adapter.revision)
        log.info("adapter_unloaded", revision=adapter.revision)

    # Generation ----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[PromptInput],
        sampling: SamplingSpec,
        adapter: str,
        return_prompt_ids: bool,
        team: str,
    ) -> AsyncIterator[list[Completion]]:
        """Validate now (errors before any completion), then stream from the engine."""
        self._require_model(team)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise invalid("prompts", f"send between 1 and {MAX_PROMPTS} prompts")
        for i, prompt in enumerate(prompts):
            if not prompt.text and not prompt.messages:
                raise invalid(f"prompts[{i}]", "is empty")
        sampling.validate(self.max_n, self.engine.max_model_len)
        adapter_version = self._find_adapter(adapter)[1].revision if adapter else None
        prompt_ids = self.engine.encode(prompts)
        check_prompt_lengths(prompt_ids, sampling.max_tokens, self.engine.max_model_len)
        request = EngineRequest(prompt_ids, sampling, adapter_version, return_prompt_ids)
        return self.engine.generate(request)

    def status(self, team: str) -> EngineStatusInfo:
        mine = bool(self._model) and self._team == team
        adapters = [LoadedAdapterInfo(a.revision, a.load_time) for a in self._adapters.values()]
        engine = self.engine
        return EngineStatusInfo(
            engine=engine.name,
            device=engine.device,
            model_revision=self._model if mine else "",
            adapters=adapters if mine else [],
            queue_depth=engine.queue_depth,
            running=engine.running,
            max_queue=engine.max_queue,
            tokens_per_second=engine.tokens_per_second(),
            max_model_len=engine.max_model_len if mine else 0,
            max_n=self.max_n,
            generated_tokens_total=engine.generated_tokens_total,
        )
