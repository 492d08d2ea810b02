"""The weight cache alone: one load per key however many wait, errors shared then retried, LRU
eviction under the byte budget and the count limit, entries in use never evicted."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import Unavailable
from services.rollout.domain import CacheTooSmall
from services.rollout.weight_cache import CachedModel, WeightCache


class Loads:
    """A loader that counts calls, can be held at a gate, and can fail."""

    def __init__(self, nbytes: int = 100) -> None:
        self.calls: list[str] = []
        self.evicted: list[str] = []
        self.replaced: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False
        self.nbytes = nbytes

    async def load(self, entry: CachedModel) -> CachedModel:
        self.calls.append(entry.version)
        await self.gate.wait()
        if self.fail:
            raise Unavailable("the registry did not answer")
        entry.nbytes = self.nbytes
        return entry

    async def evict(self, entry: CachedModel) -> None:
        self.evicted.append(entry.version)

    def replace(self, entry: CachedModel) -> None:
        self.replaced.append(entry.slot)


async def test_concurrent_requests_wait_for_one_load() -> None:
    loads = Loads()
    cache = WeightCache(1000, 0, loads.evict)
    loads.gate.clear()
    waiting = [asyncio.create_task(cache.get("t", "m1", 100, loads.load)) for _ in range(3)]
    await asyncio.sleep(0)  # let them all ask before the load ends
    loads.gate.set()
    entries = await asyncio.gather(*waiting)
    assert loads.calls == ["m1"] and all(e is entries[0] for e in entries)
    assert await cache.get("t", "m1", 100, loads.load) is entries[0] and loads.calls == ["m1"]


async def test_a_failed_load_fails_every_waiter_and_the_next_request_retries() -> None:
    loads = Loads()
    cache = WeightCache(1000, 0, loads.evict)
    loads.fail = True
    loads.gate.clear()
    waiting = [asyncio.create_task(cache.get("t", "m1", 100, loads.load)) for _ in range(2)]
    await asyncio.sleep(0)
    loads.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results) and loads.calls == ["m1"]
    loads.fail = False
    assert (await cache.get("t", "m1", 100, loads.load)).version == "m1"
    assert loads.calls == ["m1", "m1"]


async def test_least_recently_used_idle_models_go_first_and_used_ones_stay() -> None:
    loads = Loads(nbytes=100)
    cache = WeightCache(250, 0, loads.evict)  # two models fit
    a = await cache.get("t", "a", 100, loads.load)
    await cache.get("t", "b", 100, loads.load)
    await cache.get("t", "a", 100, loads.load)  # a is now the most recent
    await cache.get("t", "c", 100, loads.load)
    assert loads.evicted == ["b"] and [e.version for e in cache.entries("t")] == ["a", "c"]
    cache.acquire(a)  # in use: a request is generating on it
    d = await cache.get("t", "d", 100, loads.load)
    assert loads.evicted == ["b", "c"] and cache.peek("t", "a") is a
    cache.acquire(d)
    await cache.get("t", "e", 100, loads.load)  # over budget beside a and d, both in use
    assert cache.nbytes == 300 and loads.evicted == ["b", "c"]
    await cache.release(a)  # the excess is paid back as soon as one is free
    assert loads.evicted == ["b", "c", "a"] and cache.nbytes == 200


async def test_teams_are_apart_and_the_count_limit_holds() -> None:
    loads = Loads()
    cache = WeightCache(0, 1, loads.evict, loads.replace)  # vLLM: one model, no byte budget
    mine = await cache.get("team-a", "m", 100, loads.load)
    theirs = await cache.get("team-b", "m", 100, loads.load)
    assert mine is not theirs and mine.slot != theirs.slot
    assert loads.evicted == ["m"] and cache.entries("team-a") == []
    cache.acquire(theirs)  # in use: not evicted before the next load...
    await cache.get("team-a", "m", 100, loads.load)
    # ... but the one-model engine replaced it all the same (after draining its requests)
    assert [e.team for e in cache.entries("team-a") + cache.entries("team-b")] == ["team-a"]
    assert loads.replaced == ["team-b|m"]  # told, so the core forgets its adapters


async def test_a_model_larger_than_the_budget_is_refused() -> None:
    loads = Loads()
    cache = WeightCache(50, 0, loads.evict)
    with pytest.raises(CacheTooSmall) as err:
        await cache.get("t", "big", 100, loads.load)
    assert "TLM_ROLLOUT_CACHE_BYTES" in err.value.message and loads.calls == []
