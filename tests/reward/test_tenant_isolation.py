"""Second security review of the reward service: one team's slow rule samples must not hold
every rule worker, and the outcome cache must not tell one team what another scored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.reward import rule_runner
from services.reward.cache import content_key
from services.reward.domain import Outcome, Sample
from services.reward.rule_pool import Pool
from services.reward.rule_runner import RuleRunner
from services.reward.rule_worker import Stop, Worker
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tests.reward.test_rule_hardening import MEDIUM, SLOW, UNIQUE, alive, json_scorer, statuses
from tests.reward.test_rule_worker import started_workers
from tests.waiting import until
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc


def json_quick() -> ev.ScorerSpec:
    """A rule that always goes to a worker (json is never scored inline), quick on "[1]"."""
    return json_scorer(UNIQUE, timeout_s=5)


def with_runner(workers: int, body: Callable[[RuleRunner], Awaitable[None]]) -> None:
    """`body` with a warmed-up RuleRunner of `workers`, closed after."""

    async def main() -> None:
        runner = RuleRunner(workers)
        try:
            await runner.warm_up()
            await body(runner)
        finally:
            runner.close()

    asyncio.run(main())


def team_a_slow(runner: RuleRunner, n: int) -> list[asyncio.Future[Any]]:
    """`n` calls of team a, one SLOW sample each (60 s timeout, 40 s deadline), started."""
    slow = json_scorer(UNIQUE, timeout_s=60)
    far = time.monotonic() + 40
    return [
        asyncio.ensure_future(
            runner.run(slow, [Sample(f"s{i}", SLOW)], timeout_s=60, deadline=far, team="a")
        )
        for i in range(n)
    ]


async def team_b_quick(runner: RuleRunner) -> float:
    """Team b scores one quick sample (15 s deadline): OK; returns the seconds it took."""
    start = time.monotonic()
    got = await runner.run(
        json_quick(), [Sample("q", "[1]")], timeout_s=5, deadline=start + 15, team="b"
    )
    assert statuses(got) == ["OK"] and got[0][0].raw == 1.0
    return time.monotonic() - start


async def cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_one_team_cannot_hold_every_rule_worker() -> None:
    """Team a's samples each run to a long per-sample timeout (a spec may ask for minutes) on
    both workers; team b's quick sample gets one of them back (its worker killed after the
    grace period and replaced) instead of waiting out its deadline."""

    async def body(runner: RuleRunner) -> None:
        first = runner.worker_pids()
        hogs = team_a_slow(runner, 3)
        await until(lambda: runner._pool.held.get("a") == 2, what="team a on both workers")
        assert await team_b_quick(runner) < 8  # the grace, then a worker's start
        assert len(alive(first, expect=1)) == 1  # one killed, team a kept the other
        await cancel(hogs)

    with_runner(2, body)


@pytest.mark.slow  # spawns two rule workers: seconds
def test_a_worker_asked_back_before_its_call_starts_still_comes_back() -> None:
    """A worker handed to a call that waited for one, and asked back (by a team holding none)
    before that call sent its chunk: the ask holds, and the chunk stops before its first
    sample, so the other team gets the worker at once. (A call handed a free worker sends in
    the same turn; only a waiting one leaves this gap.)"""
    slow = json_scorer(UNIQUE, timeout_s=60).SerializeToString()

    async def body(workers: list[Worker]) -> None:
        pool = Pool()
        for worker in workers:
            pool.add(worker, expected=False)
        held = [await pool.acquire("a", 5) for _ in workers]  # team a alone holds both
        waiting = asyncio.ensure_future(pool.acquire("a", 5))
        await until(lambda: "a" in pool.waiting, what="team a's third call waits")
        pool.release("a", held[1], reuse=True)  # handed to the waiting call at once
        b = asyncio.ensure_future(pool.acquire("b", 5))
        handed = await waiting
        assert handed is held[1]
        await until(lambda: handed in pool.reclaiming, what="team b asked for it back")
        assert handed is not None
        far = time.monotonic() + 30
        reply = await asyncio.wait_for(handed.score(slow, [Sample("s", SLOW)], 60, far), 10)
        assert reply.stop is Stop.YIELDED and reply.results == []  # not one sample started
        pool.release("a", handed, reuse=True)
        assert await asyncio.wait_for(b, 1) is handed

    with started_workers(2) as workers:
        asyncio.run(body(workers))


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_a_worker_comes_back_between_samples() -> None:
    """Team a alone spreads its call over both workers; team b's call takes one back at a sample
    boundary (no worker killed), and team a's samples all finish."""

    async def body(runner: RuleRunner) -> None:
        pids = runner.worker_pids()
        samples = [Sample(f"m{i}", MEDIUM) for i in range(60)]  # 2 chunks of ~2.4 s
        deadline = time.monotonic() + 60
        call = runner.run(json_quick(), samples, timeout_s=5, deadline=deadline, team="a")
        a = asyncio.ensure_future(call)
        await until(lambda: runner._pool.held.get("a") == 2, what="team a on both workers")
        waited = await team_b_quick(runner)
        assert not a.done(), "team a finished first: the test measured nothing"
        assert waited < 1.2  # one ~80 ms sample, not the rest of a chunk nor a restart
        assert statuses(await a) == ["OK"] * 60
        assert runner.worker_pids() == pids  # given back, not killed

    with_runner(2, body)


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_a_team_alone_still_uses_the_pool() -> None:
    """A call's chunks of one team go to every worker at once and all finish."""
    scorer = json_quick()
    light = json.dumps([{"a": i} for i in range(100)])  # ~10 ms of CPU each

    async def body(runner: RuleRunner) -> None:
        call = runner.run(
            scorer, [Sample(f"m{i}", light) for i in range(64)], timeout_s=5,
            deadline=time.monotonic() + 30, team="a",
        )  # fmt: skip
        both = asyncio.ensure_future(call)
        await until(lambda: runner._pool.held.get("a") == 2, what="team a on both workers")
        assert statuses(await both) == ["OK"] * 64
        samples = [Sample(f"s{i}", "[1, 2]" if i % 2 else "[1, 1]") for i in range(300)]
        got = await runner.run(
            scorer, samples, timeout_s=5, deadline=time.monotonic() + 30, team="a"
        )
        assert [o.raw for o, _ in got] == [1.0 if i % 2 else 0.0 for i in range(300)]

    with_runner(2, body)


@pytest.mark.slow  # spawns rule workers: seconds
def test_a_scorers_measured_cost_sizes_its_chunks() -> None:
    """Chunks are sized by expected work, not by count: a scorer not measured yet sends 4
    samples as one chunk (4 x the first guess is under MIN_CHUNK_S); once its samples are seen
    to take ~80 ms each, 2 of them are worth both workers."""
    scorer = json_quick()

    async def body(runner: RuleRunner) -> None:
        payload = scorer.SerializeToString()
        assert runner._costs.expected("a", payload) == rule_runner.FIRST_GUESS_S
        assert rule_runner.chunk_size(4, rule_runner.FIRST_GUESS_S, 2) == 4
        far = time.monotonic() + 60
        first = [Sample(f"m{i}", MEDIUM) for i in range(4)]
        got = await runner.run(scorer, first, timeout_s=10, deadline=far, team="a")
        assert statuses(got) == ["OK"] * 4
        assert runner._costs.expected("a", payload) >= rule_runner.MIN_CHUNK_S  # 2 make 2 chunks
        call = runner.run(
            scorer, [Sample("x", MEDIUM), Sample("y", MEDIUM)], timeout_s=10, deadline=far,
            team="a",
        )  # fmt: skip
        two = asyncio.ensure_future(call)
        await until(lambda: runner._pool.held.get("a") == 2, what="both samples at once")
        assert statuses(await two) == ["OK", "OK"]

    with_runner(2, body)


def test_a_scorers_cost_is_its_teams_bounded_and_not_raised_by_a_split_call() -> None:
    """Each team's estimate is its own; a split call (both cores busy: samples measure slower
    than alone) may only lower it; one very slow call counts for at most MIN_CHUNK_S a sample,
    so ten-odd ordinary calls bring the estimate back."""
    costs, spec_bytes = rule_runner.Costs(), b"spec"
    ok = Outcome.ok(1.0)
    costs.observe("a", spec_bytes, [(ok, 0.001)] * 4, alone=True)
    assert costs.expected("a", spec_bytes) == pytest.approx(0.001)
    assert costs.expected("b", spec_bytes) == rule_runner.FIRST_GUESS_S  # b's are its own
    costs.observe("a", spec_bytes, [(ok, 0.002)] * 4, alone=False)  # split: not raised
    assert costs.expected("a", spec_bytes) == pytest.approx(0.001)
    costs.observe("a", spec_bytes, [(ok, 0.0005)] * 4, alone=False)  # but lowered
    lowered = costs.expected("a", spec_bytes)
    assert 0.0005 < lowered < 0.001
    timed_out = (Outcome.timeout("no result"), 60.0)
    costs.observe("a", spec_bytes, [timed_out, (Outcome.error("crashed"), 0.0)], alone=True)
    assert costs.expected("a", spec_bytes) == lowered  # no measurement in those
    costs.observe("b", spec_bytes, [(ok, 60.0)], alone=True)  # one pathological sample
    assert costs.expected("b", spec_bytes) == pytest.approx(rule_runner.MIN_CHUNK_S)
    for _ in range(12):
        costs.observe("b", spec_bytes, [(ok, 0.0005)] * 4, alone=True)
    assert costs.expected("b", spec_bytes) < 0.001


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


@pytest.mark.slow  # holds three rule workers and waits out a hung start: seconds
def test_a_hung_start_does_not_stall_the_give_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Team a holds all three workers; one dies and its replacement hangs in its start. Team b
    waits: the start counts as its worker only for START_EXPECTED_S, then one of a's two others
    is asked back, and b is served long before the hung start ends."""
    wait_ready = Worker.wait_ready
    hung: list[int] = []

    def hangs_once(worker: Worker, timeout: float) -> bool:
        if not hung:  # the first start after warm-up: the replacement
            hung.append(worker.pid)
            time.sleep(12)
        return wait_ready(worker, timeout)

    monkeypatch.setattr(rule_runner, "START_EXPECTED_S", 0.3)

    async def body(runner: RuleRunner) -> None:
        monkeypatch.setattr(Worker, "wait_ready", hangs_once)
        hogs = team_a_slow(runner, 3)
        await until(lambda: runner._pool.held.get("a") == 3, what="team a on every worker")
        os.kill(runner.worker_pids()[0], signal.SIGKILL)
        await until(lambda: bool(hung), what="its replacement starting")
        assert await team_b_quick(runner) < 8  # not the 12 s of the hung start
        await cancel(hogs)

    with_runner(3, body)
