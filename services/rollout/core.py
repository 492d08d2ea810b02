"""The rollout core: which weights serve a request, request validation, adapters and pushed
policies. Engine-agnostic; the servicer converts protobufs and calls this.

Any replica serves any request: a request names its model (`model_revision`, and an adapter),
and the weights come from the bounded cache (`weight_cache.py`), loaded on demand. A request that
names no model uses the one this team's LoadModel loaded on this replica (the older behaviour).
Pushed policy versions (`{policy}@step-{n}`) live only in memory: full weights as cache entries of
their own, adapters on their base model's entry; the newest step of a policy retires the older
ones once no request uses them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

from services.rollout.domain import (
    DTYPE_NAMES,
    MAX_PROMPTS,
    AdapterIncompatible,
    Completion,
    EngineStatusInfo,
    LoadedAdapterInfo,
    LogprobsMode,
    NoModelLoaded,
    PolicyVersionUnknown,
    PromptInput,
    PromptRejected,
    SamplingSpec,
    check_logprobs_mode,
    check_prompt_lengths,
    invalid,
)
from services.rollout.engine import Engine, EngineRequest
from services.rollout.push import PushHeader, is_pushed_version
from services.rollout.weight_cache import CachedAdapter, CachedModel, WeightCache
from services.rollout.weights import ResolvedRevision, RevisionNotFound, WeightFormat, WeightSource

log = structlog.get_logger("tlm.rollout")
WEIGHT_FILES = ("*.safetensors", "*.bin")


def adapter_model(revision: str) -> str:
    """'models/m/revisions/r2' -> 'models/m': one revision per adapter model is served."""
    return revision.split("/revisions/")[0]


def weight_bytes(folder: Path) -> int:
    """What loading a folder costs, before loading it: its weight files' size."""
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in folder.glob(pattern))


class RolloutCore:
    def __init__(
        self,
        engine: Engine,
        weights: WeightSource,
        max_n: int,
        cache_bytes: int = 0,
        scratch: Path | None = None,
    ) -> None:
        self.engine = engine
        self.weights = weights
        self.max_n = max_n
        self.cache = WeightCache(cache_bytes, engine.max_resident, self._drop, self._forget)
        self._defaults: dict[str, str] = {}  # team -> the version its LoadModel loaded here
        self._pushed_adapters: dict[tuple[str, str], str] = {}  # (team, version) -> base
        self._scratch = scratch or Path(tempfile.mkdtemp(prefix="tlm-rollout-pushed-"))
        self._lock = asyncio.Lock()  # adapter tables and pushes

    async def _fetch(self, name: str, team: str, field_path: str) -> ResolvedRevision:
        if not name:
            raise invalid(field_path, "is required, e.g. models/NAME/revisions/REV")
        try:
            return await self.weights.fetch(name, team)
        except RevisionNotFound as exc:
            raise invalid(field_path, f"unknown revision: {exc.message}") from exc

    def _forget(self, entry: CachedModel) -> None:
        """Forget an entry whose slot the engine no longer holds (or holds for new weights),
        with its pushed adapters and their scratch folders."""
        self.cache.forget(entry)
        for adapter in entry.adapters.values():
            self._forget_pushed_adapter(entry.team, adapter.revision)

    async def _drop(self, entry: CachedModel) -> None:
        """Forget an entry and free its slot in the engine (evicted, retired or superseded)."""
        self._forget(entry)
        await self.engine.unload_model(entry.slot)

    # Models ------------------------------------------------------------------------------------

    async def _model(
        self,
        name: str,
        team: str,
        field_path: str,
        dtype: str = "auto",
        max_len: int = 0,
        refresh: bool = False,
    ) -> CachedModel:
        """The cache entry for a registry revision (loaded on demand) or a pushed version. A
        resolved revision name in the cache is served without asking the registry; `refresh`
        (LoadModel) asks anyway, and reloads a name that came back with other content."""
        entry = self.cache.peek(team, name)
        if entry is not None and not (max_len or refresh) and dtype == "auto":
            return await self.cache.get(team, name, 0, self._never)  # marks it recently used
        if is_pushed_version(name):
            raise PolicyVersionUnknown(
                f"{name} is not held by this replica (never pushed here, evicted or restarted); "
                "push it again",
                metadata={"policy_version": name},
            )
        revision = await self._fetch(name, team, field_path)
        if revision.format is not WeightFormat.FULL:
            raise invalid(field_path, "is a LoRA adapter; name it in adapter_revision")
        stale = self.cache.peek(team, revision.name)
        if stale is not None and (dtype != "auto" or max_len or stale.digest != revision.digest):
            self.cache.forget(stale)  # reloaded in the same slot
        else:
            stale = None
        estimate = weight_bytes(revision.path)

        async def load(entry: CachedModel) -> CachedModel:
            await self.engine.load_model(
                revision.path, revision.name, dtype, max_len or None, entry.slot
            )
            if stale is not None:  # its adapters went with the old weights
                self._forget(stale)
            entry.max_model_len = self.engine.context_len(entry.slot)
            entry.nbytes = self.engine.model_bytes(entry.slot) or estimate
            entry.digest = revision.digest
            return entry

        return await self.cache.get(team, revision.name, estimate, load)

    @staticmethod
    async def _never(entry: CachedModel) -> CachedModel:
        raise RevisionNotFound(f"{entry.version} left the cache")

    async def load_model(self, name: str, team: str, dtype: str, max_model_len: int) -> str:
        """Warm a revision into the cache and make it this team's default model here."""
        dtype = dtype or "auto"
        if dtype not in DTYPE_NAMES:  # checked before any download
            raise invalid("dtype", f"expected one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        if max_model_len < 0:
            raise invalid("max_model_len", "must be >= 0 (0: the model's own)")
        if is_pushed_version(name):
            raise invalid("model_revision", "name a registry revision; pushed versions need none")
        entry = await self._model(name, team, "model_revision", dtype, max_model_len, True)
        self._defaults[team] = entry.version
        log.info("model_loaded", revision=entry.version, engine=self.engine.name, team=team)
        return entry.version

    async def _default(self, team: str) -> CachedModel:
        name = self._defaults.get(team)
        if name is None:
            raise NoModelLoaded(
                "no model is loaded for your team; name model_revision in the request, or call "
                "LoadModel first"
            )
        return await self._model(name, team, "model_revision")

    # Adapters ----------------------------------------------------------------------------------

    async def load_adapter(self, name: str, team: str) -> str:
        entry = await self._default(team)
        self.cache.acquire(entry)
        try:
            adapter = await self._adapter(entry, name, team, refresh=True)
        finally:
            await self.cache.release(entry)
        log.info("adapter_loaded", revision=adapter.revision, model=entry.version)
        return adapter.revision

    @staticmethod
    def _find_adapter(entry: CachedModel, name: str) -> tuple[str, CachedAdapter] | None:
        for key, adapter in entry.adapters.items():
            if name in adapter.names:
                return key, adapter
        return None

    async def _adapter(
        self, entry: CachedModel, name: str, team: str, refresh: bool = False
    ) -> CachedAdapter:
        """The adapter `name` on `entry`, loaded from the registry if it is not there yet (or,
        with `refresh`, if the registry now holds other content under its name)."""
        found = self._find_adapter(entry, name)
        if found is not None and not (refresh and found[1].digest):
            return found[1]
        if is_pushed_version(name):
            raise PolicyVersionUnknown(
                f"adapter {name} is not held by this replica on {entry.version}; push it again",
                metadata={"policy_version": name},
            )
        revision = await self._fetch(name, team, "adapter_revision")
        if revision.format is not WeightFormat.LORA:
            raise invalid("adapter_revision", "is full weights; name it in model_revision")
        base = revision.base_model_revision
        resolved_base = await self.weights.resolve(base, team) if base else ""
        if resolved_base != entry.version:
            raise AdapterIncompatible(
                f"adapter {revision.name} was trained on {base or 'an unknown base'}, "
                f"but {entry.version} is the model asked for",
                metadata={"adapter_revision": revision.name, "model_revision": entry.version},
            )
        async with self._lock:
            adapter = await self._put_adapter(
                entry, adapter_model(revision.name), revision.path, revision.name, revision.digest
            )
        adapter.names |= {name, revision.name, adapter_model(revision.name)}
        return adapter

    async def _put_adapter(
        self, entry: CachedModel, key: str, path: Path, version: str, digest: str
    ) -> CachedAdapter:
        """Load `version` as `entry`'s adapter `key`, replacing the one there (requests running on
        it finish first). Engines key adapters by name: a name that comes back with other
        content (a model deleted and uploaded again) is unloaded first. Call with _lock held."""
        old = entry.adapters.get(key)
        if old is not None and old.revision == version and old.digest == digest:
            return old
        if old is not None and old.revision == version:
            del entry.adapters[key]
            await self.engine.unload_adapter(old.revision, entry.slot)
            log.info("adapter_content_changed", revision=version, digest=digest)
            old = None
        await self.engine.load_adapter(path, version, entry.slot)
        entry.adapters[key] = adapter = CachedAdapter(version, time.time(), digest)
        if old is not None:
            await self.engine.unload_adapter(old.revision, entry.slot)
            self._forget_pushed_adapter(entry.team, old.revision)
        return adapter

    def _forget_pushed_adapter(self, team: str, version: str) -> None:
        if self._pushed_adapters.pop((team, version), None) is not None:
            shutil.rmtree(self._scratch / _folder_name(team, version), ignore_errors=True)

    async def unload_adapter(self, name: str, team: str) -> None:
        entry = await self._default(team)
        async with self._lock:
            found = self._find_adapter(entry, name)
            if found is None:
                raise invalid("adapter_revision", f"{name} is not loaded")
            key, adapter = found
            del entry.adapters[key]
            await self.engine.unload_adapter(adapter.revision, entry.slot)
            self._forget_pushed_adapter(team, adapter.revision)
        log.info("adapter_unloaded", revision=adapter.revision)

    # Pushed policies ---------------------------------------------------------------------------

    async def push(self, header: PushHeader, tensors: dict[str, torch.Tensor], team: str) -> str:
        """Hold pushed weights as the policy version `{policy}@step-{step}`."""
        header.check()
        version = header.version
        if header.lora:
            return await self._push_adapter(header, tensors, team)
        base = await self._fetch(header.base_model_revision, team, "header.base_model_revision")
        if base.format is not WeightFormat.FULL:
            raise invalid("header.base_model_revision", "is a LoRA adapter, not a full model")
        async with self._lock:
            older = [e for e in self.cache.entries(team) if e.policy == header.policy]
            reuse = next((e for e in older if e.users == 0), None)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            entry = CachedModel(
                team, version, nbytes, 0, base=base.name, policy=header.policy, step=header.step
            )
            if reuse is not None:
                self.cache.forget(reuse)  # its weights are overwritten in place
            else:
                await self.cache.make_room(weight_bytes(base.path), extra=1)
            slot = reuse.slot if reuse else None
            try:
                await self.engine.push_weights(base.path, entry.slot, version, tensors, slot)
            except BaseException:
                if reuse is not None:  # refused before any weight changed: still served
                    self.cache.put(reuse)
                raise
            entry.max_model_len = self.engine.context_len(entry.slot)
            entry.nbytes = self.engine.model_bytes(entry.slot) or nbytes
            self.cache.put(entry)
            for old in older:
                if old is reuse:
                    self._forget(old)  # its slot holds the new weights
                elif old.users == 0:
                    await self._drop(old)
        log.info(
            "weights_pushed", version=version, team=team, tensors=len(tensors), reused=bool(slot)
        )
        return version

    async def _push_adapter(
        self, header: PushHeader, tensors: dict[str, torch.Tensor], team: str
    ) -> str:
        """An adapter on its base model's entry, replacing the policy's older step there. Written
        as a PEFT folder, which both engines load (and vLLM may reload from it later)."""
        try:
            json.loads(header.adapter_config_json)
        except ValueError as exc:
            raise invalid("header.adapter_config_json", f"is not JSON: {exc}") from exc
        entry = await self._model(header.base_model_revision, team, "header.base_model_revision")
        self.cache.acquire(entry)
        try:
            folder = self._scratch / _folder_name(team, header.version)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text(header.adapter_config_json)
            await asyncio.to_thread(save_file, tensors, str(folder / "adapter_model.safetensors"))
            async with self._lock:
                adapter = await self._put_adapter(
                    entry, header.policy, folder, header.version, digest=""
                )
                adapter.names.add(header.version)
                self._pushed_adapters[(team, header.version)] = entry.version
        finally:
            await self.cache.release(entry)
        log.info("adapter_pushed", version=header.version, model=entry.version, team=team)
        return header.version

    # Generation ----------------------------------------------------------------------------------

    async def _serving(self, model: str, adapter: str, team: str) -> CachedModel:
        """The entry a request runs on: the model it names, else its adapter's base, else this
        team's default model here."""
        if model:
            return await self._model(model, team, "model_revision")
        if adapter:
            base = self._pushed_adapters.get((team, adapter))
            if base is not None:
                return await self._model(base, team, "model_revision")
            default = self._defaults.get(team)
            default_entry = self.cache.peek(team, default) if default else None
            if default_entry is not None and self._find_adapter(default_entry, adapter):
                return await self._default(team)
            if not is_pushed_version(adapter) and not default:
                revision = await self._fetch(adapter, team, "adapter_revision")
                if revision.base_model_revision:
                    return await self._model(revision.base_model_revision, team, "adapter_revision")
        return await self._default(team)

    async def generate(
        self,
        prompts: Sequence[PromptInput],
        sampling: SamplingSpec,
        adapter: str,
        return_prompt_ids: bool,
        team: str,
        logprobs_mode: LogprobsMode = LogprobsMode.RAW,
        model: str = "",
    ) -> AsyncIterator[list[Completion]]:
        """Validate and load first (errors before any completion), then stream from the engine."""
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise invalid("prompts", f"send between 1 and {MAX_PROMPTS} prompts")
        for i, prompt in enumerate(prompts):
            if not prompt.text and not prompt.messages:
                raise invalid(f"prompts[{i}]", "is empty")
        entry = await self._serving(model, adapter, team)
        self.cache.acquire(entry)
        try:
            sampling.validate(self.max_n, entry.max_model_len)
            check_logprobs_mode(logprobs_mode, sampling)
            adapter_version = (
                (await self._adapter(entry, adapter, team)).revision if adapter else None
            )
            prompt_ids = [self._encode(i, p, entry.slot) for i, p in enumerate(prompts)]
            check_prompt_lengths(prompt_ids, sampling.max_tokens, entry.max_model_len)
            request = EngineRequest(
                prompt_ids, sampling, adapter_version, return_prompt_ids, logprobs_mode, entry.slot
            )
            stream = self.engine.generate(request)
            try:
                async for completions in stream:
                    yield completions
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        finally:
            await self.cache.release(entry)
            await self._retire_if_superseded(entry)

    async def _retire_if_superseded(self, entry: CachedModel) -> None:
        """A pushed version whose policy has a newer step cached goes once no request uses it."""
        if not entry.policy or entry.users:
            return
        newer = any(
            e.policy == entry.policy and e.step > entry.step for e in self.cache.entries(entry.team)
        )
        if newer and self.cache.peek(entry.team, entry.version) is entry:
            await self._drop(entry)

    def _encode(self, index: int, prompt: PromptInput, slot: str) -> list[int]:
        try:
            return self.engine.encode([prompt], slot)[0]
        except PromptRejected as exc:
            raise invalid(f"prompts[{index}]", exc.message) from exc

    def status(self, team: str) -> EngineStatusInfo:
        """A team sees its own models, and the engine's counters once it has one here; other
        teams' models only as cache bytes."""
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
            cached_models=[e.version for e in self.cache.entries(team)],
            cache_bytes=self.cache.nbytes,
            cache_budget_bytes=self.cache.budget_bytes,
        )
        if not limits.cached_models:
            return limits
        counters = dataclasses.replace(
            limits,
            queue_depth=engine.queue_depth,
            running=engine.running,
            tokens_per_second=engine.tokens_per_second(),
            generated_tokens_total=engine.generated_tokens_total,
        )
        default = self.cache.peek(team, self._defaults.get(team, ""))
        if default is None:
            return counters
        adapters = [LoadedAdapterInfo(a.revision, a.load_time) for a in default.adapters.values()]
        return dataclasses.replace(
            counters,
            model_revision=default.version,
            adapters=adapters,
            max_model_len=default.max_model_len,
        )


def _folder_name(team: str, version: str) -> str:
    return f"{team}--{version.replace('/', '--')}"
