"""The rule workers' sharing policy alone (`Pool`), on stand-in workers that only record being
asked back: who gets a free worker, who gives one back and when the ask is withdrawn. The same
policy with real worker processes: test_tenant_isolation.py."""

from __future__ import annotations

import asyncio
from typing import cast

from services.reward.rule_pool import RECLAIM_GRACE_S, Pool
from services.reward.rule_worker import Worker


class Stand:
    """A worker as the pool sees it: whether it is asked back now, and how often it was."""

    def __init__(self) -> None:
        self.wanted = False
        self.asked: list[float] = []

    def give_back(self, grace_s: float) -> None:
        self.wanted = True
        self.asked.append(grace_s)

    def keep(self) -> None:
        self.wanted = False


def stands(pool: Pool, n: int) -> list[Stand]:
    made = [Stand() for _ in range(n)]
    for w in made:
        pool.expect()
        pool.add(cast(Worker, w))
    return made


def test_a_team_holding_several_gives_one_back_to_a_team_holding_none() -> None:
    async def body() -> None:
        pool = Pool()
        stands(pool, 2)
        first = cast(Stand, await pool.acquire("a", 1))
        second = cast(Stand, await pool.acquire("a", 1))  # a team alone takes every worker
        assert pool.held == {"a": 2} and not first.asked and not second.asked
        b = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0)
        asked = [w for w in (first, second) if w.wanted]
        assert len(asked) == 1 and asked[0].asked == [RECLAIM_GRACE_S]  # one, not both
        other = second if asked[0] is first else first
        pool.release("a", cast(Worker, other), reuse=True)  # another frees first: b takes it
        assert await b is other
        assert not asked[0].wanted and pool.reclaiming == set()  # the ask is withdrawn
        assert pool.held == {"a": 1, "b": 1}
        c = asyncio.ensure_future(pool.acquire("c", 0.2))  # everyone holds one: nobody gives
        assert await c is None and len(asked[0].asked) == 1 and not other.asked

    asyncio.run(body())


def test_no_worker_is_asked_back_while_one_is_starting() -> None:
    async def body() -> None:
        pool = Pool()
        stands(pool, 2)
        held = [cast(Stand, await pool.acquire("a", 1)) for _ in range(2)]
        pool.expect()  # a replacement is starting
        b = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0)
        assert not any(w.asked for w in held)
        new = Stand()
        pool.add(cast(Worker, new))
        assert await b is new

    asyncio.run(body())


def test_a_chunk_once_reclaimed_keeps_its_worker() -> None:
    """A chunk whose sample was killed to give its worker back is not asked back again (one
    such worker per team); the team's other workers are, the most recently handed out first."""

    async def body() -> None:
        pool = Pool()
        stands(pool, 3)
        kept = cast(Stand, await pool.acquire("a", 1, kept=True))
        second = cast(Stand, await pool.acquire("a", 1, kept=True))  # a's kept one is taken
        third = cast(Stand, await pool.acquire("a", 1))  # the last free one: no worker idles
        assert pool.kept == {cast(Worker, kept)} and pool.held == {"a": 3}
        b = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0)
        assert third.wanted and not second.asked and not kept.asked  # the newest first
        c = asyncio.ensure_future(pool.acquire("c", 5))
        await asyncio.sleep(0)
        assert second.wanted and not kept.asked  # then the next; a keeps its kept one
        pool.release("a", cast(Worker, third), reuse=True)  # it yielded
        pool.release("a", cast(Worker, second), reuse=True)
        assert {await b, await c} == {third, second} and pool.held == {"a": 1, "b": 1, "c": 1}
        d = asyncio.ensure_future(pool.acquire("d", 0.2))  # a holds one: it keeps it
        assert await d is None and not kept.asked

    asyncio.run(body())


def test_a_replacement_starting_is_counted_before_the_release() -> None:
    """A worker killed while asked back (here: at its request's deadline) is replaced; the
    waiting team is owed that replacement, so no second worker is asked back meanwhile."""

    async def body() -> None:
        pool = Pool()
        stands(pool, 3)
        held = [cast(Stand, await pool.acquire("a", 1)) for _ in range(3)]
        b = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0)
        asked = [w for w in held if w.wanted]
        assert len(asked) == 1
        pool.expect()  # what RuleRunner._call does before releasing a worker it replaces
        pool.release("a", cast(Worker, asked[0]), reuse=False)
        assert [w for w in held if w.asked] == asked  # nobody else asked
        new = Stand()
        pool.add(cast(Worker, new))
        assert await b is new

    asyncio.run(body())
