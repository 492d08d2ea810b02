"""The rollout core: which weights are served (and for which team), request validation, and
the adapter table. Engine-agnostic; the servicer converts protobufs and calls this.

Ownership: the loaded model belongs to the team that loaded it. Another team may replace it
only while the replica is idle: nothing running or queued, and no request from the owner for
`takeover_idle_s` seconds. The owner may always replace its own model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from services.rollout.domain import (
    DTYPE_NAMES,
    MAX_PROMPTS,
    AdapterIncompatible,
    Completion,
    EngineStatusInfo,
    LoadedAdapterInfo,
    LogprobsMode,
    ModelOwnedByAnotherTeam,
    NoModelLoaded,
    PromptInput,
    PromptRejected,
    SamplingSpec,
    check_logprobs_mode,
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
    digest: str  # its files' content: the same name may come back with other weights
    names: set[str] = field(default_factory=set)  # every name it was loaded as


def adapter_model(revision: str) -> str:
    """'models/m/revisions/r2' -> 'models/m': one revision per adapter model is served."""
    return revision.split("/revisions/")[0]


class RolloutCore:
    def __init__(
        self, engine: Engine, weights: WeightSource, max_n: int, takeover_idle_s: float = 300.0
    ) -> None:
        self.engine = engine
        self.weights = weights
        self.max_n = max_n
        self.takeover_idle_s = takeover_idle_s
        self._team: str | None = None
        self._model = ""
        self._adapters: dict[str, _Adapter] = {}  # adapter model -> its loaded revision
        self._last_used = 0.0  # time.monotonic() of the owner's last request
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
            raise NoModelLoaded("no model is loaded for your team; call LoadModel first")
        return self._model

    def _check_takeover(self, team: str) -> None:
        """Another team's model may be replaced only while the replica is idle."""
        if not self._model or self._team == team:
            return
        idle_s = time.monotonic() - self._last_used
        busy = self.engine.running or self.engine.queue_depth
        if busy or idle_s < self.takeover_idle_s:
            raise ModelOwnedByAnotherTeam(
                "this replica serves another team's model; it can be replaced once it has "
                f"been idle for {self.takeover_idle_s:g} s",
                metadata={"takeover_idle_s": f"{self.takeover_idle_s:g}"},
            )

    # Weights -----------------------------------------------------------------------------------

    async def load_model(self, name: str, team: str, dtype: str, max_model_len: int) -> str:
        dtype = dtype or "auto"
        if dtype not in DTYPE_NAMES:  # checked before any download
            raise invalid("dtype", f"expected one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        if max_model_len < 0:
            raise invalid("max_model_len", "must be >= 0 (0: the model's own)")
        self._check_takeover(team)
        revision = await self._fetch(name, team, "model_revision")
        if revision.format is not WeightFormat.FULL:
            raise invalid("model_revision", "is a LoRA adapter; load it with LoadAdapter")
        async with self._lock:
            self._check_takeover(team)  # requests may have arrived during the download
            try:
                await self.engine.load_model(
                    revision.path, revision.name, dtype, max_model_len or None
                )
            except BaseException:
                if not self.engine.max_model_len:  # the engine lost its old model too
                    self._team, self._model, self._adapters = None, "", {}
                raise
            self._team, self._model, self._adapters = team, revision.name, {}
            self._last_used = time.monotonic()
        log.info("model_loaded", revision=revision.name, engine=self.engine.name, team=team)
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
            key = adapter_model(revision.name)
            old = await self._drop_if_stale(key, revision)
            await self.engine.load_adapter(revision.path, revision.name)
            if old is None or old.revision != revision.name:
                self._adapters[key] = _Adapter(revision.name, time.time(), revision.digest)
            self._adapters[key].names |= {name, revision.name, key}
            if old is not None and old.revision != revision.name:
                await self.engine.unload_adapter(old.revision)  # running requests finish first
        log.info("adapter_loaded", revision=revision.name, replaced=old.revision if old else None)
        return revision.name

    async def _drop_if_stale(self, key: str, revision: ResolvedRevision) -> _Adapter | None:
        """The adapter loaded for `key`, unless it has `revision`'s name but other content (the
        model was deleted and uploaded again): engines key adapters by name, so unload that
        one first (running requests finish on it) and report none loaded."""
        old = self._adapters.get(key)
        if old is None or old.revision != revision.name or old.digest == revision.digest:
            return old
        del self._adapters[key]
        await self.engine.unload_adapter(old.revision)
        log.info("adapter_content_changed", revision=revision.name, digest=revision.digest)
        return None

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
        logprobs_mode: LogprobsMode = LogprobsMode.RAW,
    ) -> AsyncIterator[list[Completion]]:
        """Validate now (errors before any completion), then stream from the engine."""
        self._require_model(team)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise invalid("prompts", f"send between 1 and {MAX_PROMPTS} prompts")
        for i, prompt in enumerate(prompts):
            if not prompt.text and not prompt.messages:
                raise invalid(f"prompts[{i}]", "is empty")
        sampling.validate(self.max_n, self.engine.max_model_len)
        check_logprobs_mode(logprobs_mode, sampling)
        adapter_version = self._find_adapter(adapter)[1].revision if adapter else None
        prompt_ids = [self._encode(i, p) for i, p in enumerate(prompts)]
        check_prompt_lengths(prompt_ids, sampling.max_tokens, self.engine.max_model_len)
        request = EngineRequest(
            prompt_ids, sampling, adapter_version, return_prompt_ids, logprobs_mode
        )
        self._last_used = time.monotonic()
        return self._tracked(self.engine.generate(request))

    def _encode(self, index: int, prompt: PromptInput) -> list[int]:
        try:
            return self.engine.encode([prompt])[0]
        except PromptRejected as exc:
            raise invalid(f"prompts[{index}]", exc.message) from exc

    async def _tracked(
        self, stream: AsyncIterator[list[Completion]]
    ) -> AsyncIterator[list[Completion]]:
        """The engine's stream; its end counts as the owner's last use (see _check_takeover)."""
        try:
            async for completions in stream:
                yield completions
        finally:
            self._last_used = time.monotonic()
            await stream.aclose()  # type: ignore[attr-defined]

    def status(self, team: str) -> EngineStatusInfo:
        """The owner sees everything; other teams see the engine, device and limits only."""
        engine = self.engine
        limits = EngineStatusInfo(
            engine=engine.name,
            device=engine.device,
            model_revision="",
            adapters=[],
            queue_depth=0,
            running=0,
            max_queue=engine.max_queue,
            tokens_per_second=0.0,
            max_model_len=0,
            max_n=self.max_n,
            generated_tokens_total=0,
        )
        if not self._model or self._team != team:
            return limits
        adapters = [LoadedAdapterInfo(a.revision, a.load_time) for a in self._adapters.values()]
        return dataclasses.replace(
            limits,
            model_revision=self._model,
            adapters=adapters,
            queue_depth=engine.queue_depth,
            running=engine.running,
            tokens_per_second=engine.tokens_per_second(),
            max_model_len=engine.max_model_len,
            generated_tokens_total=engine.generated_tokens_total,
        )
