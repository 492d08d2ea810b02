"""Second security review of the reward service: one team's slow rule samples must not hold
every rule worker, and the outcome cache must not tell one team what another scored."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.reward.cache import content_key
from services.reward.domain import Sample
from services.reward.rule_runner import RECLAIM_GRACE_S, RuleRunner, _Pool
from services.reward.rule_worker import Worker
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tests.reward.test_rule_hardening import SLOW, UNIQUE, json_scorer, statuses
from tests.waiting import until
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc


def json_quick() -> ev.ScorerSpec:
    """A rule that always goes to a worker (json is never scored inline), quick on "[1]"."""
    return json_scorer(UNIQUE, timeout_s=5)


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_one_team_cannot_hold_every_rule_worker() -> None:
    """Team a's samples each run to a long per-sample timeout (a spec may ask for minutes) on
    both workers (the second on loan); team b's quick sample gets the loan back (its worker
    killed after the grace period and replaced) instead of waiting out its deadline."""
    slow = json_scorer(UNIQUE, timeout_s=60)

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            far = time.monotonic() + 30
            hogs = [
                asyncio.ensure_future(
                    runner.run(slow, [Sample(f"s{i}", SLOW)], timeout_s=60, deadline=far, team="a")
                )
                for i in range(3)
            ]
            await until(lambda: runner._pool.held.get("a") == 2, what="team a on both workers")
            start = time.monotonic()
            got = await runner.run(
                json_quick(), [Sample("q", "[1]")], timeout_s=5, deadline=start + 15, team="b"
            )
            assert statuses(got) == ["OK"] and got[0][0].raw == 1.0
            assert time.monotonic() - start < 8  # the grace, then a worker's start
            for hog in hogs:
                hog.cancel()
            await asyncio.gather(*hogs, return_exceptions=True)
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_a_loaned_worker_comes_back_between_samples() -> None:
    """Team a alone spreads its call over both workers; team b's call takes the loaned one back
    at a sample boundary (no worker killed), and team a's samples all finish."""
    medium = json.dumps([{"a": i} for i in range(300)])  # ~80 ms of CPU each

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            pids = runner.worker_pids()
            samples = [Sample(f"m{i}", medium) for i in range(60)]  # 2 chunks of ~2.4 s
            deadline = time.monotonic() + 60
            call = runner.run(json_quick(), samples, timeout_s=5, deadline=deadline, team="a")
            a = asyncio.ensure_future(call)
            await until(lambda: runner._pool.held.get("a") == 2, what="team a on both workers")
            start = time.monotonic()
            got = await runner.run(
                json_quick(), [Sample("q", "[1]")], timeout_s=5, deadline=start + 15, team="b"
            )
            waited = time.monotonic() - start
            assert statuses(got) == ["OK"]
            assert not a.done(), "team a finished first: the test measured nothing"
            assert waited < 1.2  # one ~80 ms sample, not the rest of a chunk nor a restart
            assert statuses(await a) == ["OK"] * 60
            assert runner.worker_pids() == pids  # given back, not killed
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_a_team_alone_still_uses_the_pool() -> None:
    """A call's chunks of one team go to every worker and all finish."""
    scorer = json_quick()

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            samples = [Sample(f"s{i}", "[1, 2]" if i % 2 else "[1, 1]") for i in range(300)]
            got = await runner.run(
                scorer, samples, timeout_s=5, deadline=time.monotonic() + 30, team="a"
            )
            assert [o.raw for o, _ in got] == [1.0 if i % 2 else 0.0 for i in range(300)]
        finally:
            runner.close()

    asyncio.run(body())


class Stand:
    """A worker as the pool sees it: it only records being asked back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.asked: list[float] = []

    def give_back(self, grace_s: float) -> None:
        self.asked.append(grace_s)


def test_the_pool_lends_the_last_worker_and_asks_it_back() -> None:
    async def body() -> None:
        pool = _Pool()
        one, two = Stand("one"), Stand("two")
        for w in (one, two):
            pool.add(cast(Worker, w))
        first = await pool.acquire("a", 1)
        second = await pool.acquire("a", 1)  # a team alone takes the last one too: a loan
        assert {first, second} == {one, two} and pool.loans == {second: "a"}
        assert one.asked == two.asked == []
        b = asyncio.ensure_future(pool.acquire("b", 5))
        await asyncio.sleep(0)
        assert cast(Stand, second).asked == [RECLAIM_GRACE_S]  # the loan, not the other
        assert cast(Stand, first).asked == []
        c = asyncio.ensure_future(pool.acquire("a", 5))  # team a waits too: b goes first
        await asyncio.sleep(0)
        assert second is not None
        pool.release("a", second, reuse=True)  # the loan came back
        assert await b is second and not c.done()
        assert pool.loans == {} and pool.reclaiming == set() and pool.held == {"a": 1, "b": 1}
        assert first is not None
        pool.release("a", first, reuse=True)  # c: not a loan (a holds none now)
        assert await c is first and pool.loans == {}
        d = asyncio.ensure_future(pool.acquire("b", 0.2))  # b holds one: no loan asked back
        assert await d is None and cast(Stand, first).asked == []

    asyncio.run(body())


def test_cache_keys_differ_between_teams() -> None:
    scorer = ev.ScorerSpec(name="e")
    scorer.exact_match.SetInParent()
    one = Sample("s", "42", metadata={"reference": "42"})
    assert content_key(scorer, one, "team-a") != content_key(scorer, one, "team-b")
    assert content_key(scorer, one, "team-a") == content_key(scorer, one, "team-a")


def test_cached_outcomes_are_not_shared_between_teams(tmp_path: Path) -> None:
    """Team b must not learn (from `cached` or latency) that team a scored this exact
    completion and reference; team a's own repeat is still a hit."""
    keys = {"key-a": "team-a", "key-b": "team-b"}
    server = start_reward(tmp_path, api_keys=keys, insecure_dev=False)
    request = rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "e", "exact_match": {}}]}),
        samples=[sample("s", "secret-7731", reference="secret-7731")],
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)

            def cached(key: str) -> bool:
                result = stub.Score(request, timeout=30, metadata=(("x-api-key", key),)).results[0]
                assert result.status == rs.SCORE_STATUS_OK and result.reward == 1.0
                return result.scorers[0].cached

            assert cached("key-a") is False
            assert cached("key-b") is False
            assert cached("key-a") is True
    finally:
        server.stop()
