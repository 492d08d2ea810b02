"""The bounded cache of loaded weights that makes replicas interchangeable: any request names the
model it wants, and the replica that gets it loads that model on demand.

Entries are keyed by (team, version); the engine holds the weights under the entry's `slot`.
Least recently used entries that no request uses are evicted to keep the bytes under the budget
(and the count under the engine's `max_resident`: 1 for vLLM, one engine per GPU). A request for
an entry being loaded waits for that load (one load per key, whoever asked first); if the load
fails, every waiter gets the error and the next request tries again. An entry in use is never
evicted; a load that does not fit beside the entries in use goes ahead over the budget, and the
excess is evicted as soon as those requests end. No grpc here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from services.rollout.domain import CacheTooSmall

log = structlog.get_logger("tlm.rollout.cache")

Key = tuple[str, str]  # (team, version)


@dataclass(eq=False)
class CachedAdapter:
    revision: str  # the version its completions report
    load_time: float
    digest: str = ""  # its files' content: a registry name may come back with other weights
    names: set[str] = field(default_factory=set)  # every name it was asked for by


@dataclass(eq=False)
class CachedModel:
    team: str
    version: str  # what completions report: a registry revision or "{policy}@step-{n}"
    nbytes: int
    max_model_len: int
    base: str = ""  # pushed weights: the registry revision they derive from
    policy: str = ""  # pushed weights: the policy whose step they are
    step: int = 0
    digest: str = ""  # registry weights: their files' content (see RolloutCore._model)
    users: int = 0  # requests accepted on it and not finished
    adapters: dict[str, CachedAdapter] = field(default_factory=dict)  # key -> adapter

    @property
    def slot(self) -> str:
        """The engine's name for these weights: versions of two teams may share a name."""
        return f"{self.team}|{self.version}"


Loader = Callable[[CachedModel], Awaitable[CachedModel]]


class WeightCache:
    def __init__(
        self,
        budget_bytes: int,
        max_resident: int,
        evict: Callable[[CachedModel], Awaitable[None]],
        replaced: Callable[[CachedModel], None] = lambda entry: None,
    ) -> None:
        """`evict` frees an idle entry's weights; `replaced` is told of an entry that the engine
        replaced by loading another (see `put`)."""
        self.budget_bytes = budget_bytes
        self.max_resident = max_resident  # 0: no limit but the budget
        self._evict = evict
        self._replaced = replaced
        self._entries: OrderedDict[Key, CachedModel] = OrderedDict()
        self._loading: dict[Key, asyncio.Task[CachedModel]] = {}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def peek(self, team: str, version: str) -> CachedModel | None:
        return self._entries.get((team, version))

    def entries(self, team: str) -> list[CachedModel]:
        """This team's entries, least recently used first."""
        return [e for e in self._entries.values() if e.team == team]

    async def get(self, team: str, version: str, estimate: int, load: Loader) -> CachedModel:
        """The entry, loaded by `load` if needed (one load per key; others wait for it). The
        caller must `acquire` before awaiting anything else, or the entry may be evicted."""
        key = (team, version)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, estimate, load))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)  # a cancelled waiter leaves the load to the others

    async def _load(self, key: Key, estimate: int, load: Loader) -> CachedModel:
        if self.budget_bytes and estimate > self.budget_bytes:
            raise CacheTooSmall(
                f"{key[1]} needs about {estimate} bytes, more than the rollout weight cache's "
                f"budget of {self.budget_bytes} (TLM_ROLLOUT_CACHE_BYTES)",
                metadata={"cache_bytes": str(self.budget_bytes), "needed": str(estimate)},
            )
        await self.make_room(estimate, extra=1)
        entry = await load(CachedModel(key[0], key[1], estimate, 0))
        self.put(entry)
        return entry

    def put(self, entry: CachedModel) -> None:
        """Add (or replace) an entry that is loaded in the engine."""
        key = (entry.team, entry.version)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        log.info("weights_cached", version=entry.version, team=entry.team, nbytes=entry.nbytes)
        while self.max_resident and len(self._entries) > self.max_resident:
            # An engine that holds `max_resident` models (vLLM: one) has just replaced the
            # oldest, in use or not (it drained its requests first): it is no longer there.
            old = next(iter(self._entries.values()))
            del self._entries[(old.team, old.version)]
            log.info("weights_replaced", version=old.version, team=old.team)
            self._replaced(old)

    def forget(self, entry: CachedModel) -> None:
        """Drop an entry whose weights the engine no longer holds under its slot."""
        key = (entry.team, entry.version)
        if self._entries.get(key) is entry:
            del self._entries[key]

    def acquire(self, entry: CachedModel) -> None:
        entry.users += 1

    async def release(self, entry: CachedModel) -> None:
        entry.users -= 1
        await self.make_room(0)  # a load that went over the budget is paid back now

    async def make_room(self, incoming: int, extra: int = 0) -> None:
        """Evict idle entries, least recently used first, until `incoming` more bytes (and
        `extra` more entries) fit."""
        for key, entry in list(self._entries.items()):
            over_bytes = self.budget_bytes and self.nbytes + incoming > self.budget_bytes
            over_count = self.max_resident and len(self._entries) + extra > self.max_resident
            if not (over_bytes or over_count):
                return
            if entry.users == 0 and self._entries.get(key) is entry:
                del self._entries[key]
                log.info("weights_evicted", version=entry.version, team=entry.team)
                await self._evict(entry)
