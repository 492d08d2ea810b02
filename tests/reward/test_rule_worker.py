"""The rule worker's protocol: a chunk's results come back in one message, the server still
knows which sample is running, and results finished before a stuck sample are not lost."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import pytest

from services.reward.domain import Sample, Status
from services.reward.rule_runner import START_TIMEOUT_S, RuleRunner
from services.reward.rule_worker import CHUNK, Result, Stop, Worker
from tests.reward.test_rule_hardening import MEDIUM, SLOW, UNIQUE, json_scorer, statuses
from tests.waiting import until
from tlm.reward.v1 import evaluator_pb2 as ev

REGEX = ev.ScorerSpec(name="r", regex=ev.RegexScorer(pattern="^ok$"))


@contextlib.contextmanager
def started_workers(n: int) -> Iterator[list[Worker]]:
    """`n` spawned rule workers, ready; killed and reaped after."""
    context = multiprocessing.get_context("spawn")
    workers = [Worker(context) for _ in range(n)]
    try:
        assert all(w.wait_ready(START_TIMEOUT_S) for w in workers)
        yield workers
    finally:
        for worker in workers:
            worker.kill()
            worker.reap()


@pytest.fixture
def worker() -> Iterator[Worker]:
    with started_workers(1) as (started,):
        yield started


@pytest.mark.slow  # spawns a rule worker: seconds
def test_a_chunk_comes_back_in_one_message(worker: Worker) -> None:
    """Not one message per sample: each one woke the server, which on busy cores cost the
    worker its core. A chunk of quick samples takes a message or, if the worker is held up for
    over 100 ms (FLUSH_S) in between, a few."""
    samples = [Sample(f"s{i}", "ok" if i % 2 else "no") for i in range(CHUNK)]
    worker.conn.send((REGEX.SerializeToString(), samples, time.monotonic() + 60))
    messages: list[list[Result]] = []
    while sum(len(m) for m in messages) < CHUNK:
        assert worker.conn.poll(30)
        messages.append(worker.conn.recv())
    assert len(messages) <= 4
    got = [outcome.raw for m in messages for outcome, _ in m]
    assert got == [1.0 if i % 2 else 0.0 for i in range(CHUNK)]


@pytest.mark.slow  # spawns a rule worker: seconds
def test_a_chunk_is_sent_before_the_caller_awaits(worker: Worker) -> None:
    """score() sends at once: the worker scores while the event loop does other work (the
    engine scores its cheap rules meanwhile) rather than after the loop's next turn."""
    samples = [Sample("a", "[1, 2]"), Sample("b", "[1, 1]")]
    scorer = json_scorer(UNIQUE, timeout_s=60).SerializeToString()

    async def body() -> None:
        sent = time.monotonic()
        replies = worker.score(scorer, samples, 60, sent + 60)
        # The loop is busy (no await): only a chunk already sent can be scored meanwhile.
        while not worker.starts[1] and time.monotonic() - sent < 30:
            time.sleep(0.01)
        assert worker.starts[0] > sent and worker.starts[1] >= worker.starts[0]
        reply = await asyncio.wait_for(replies, 10)
        assert reply.stop is Stop.DONE
        assert [o.raw for o, _ in reply.results] == [1.0, 0.0]

    asyncio.run(body())


@pytest.mark.slow  # spawns a rule worker and kills it: seconds
def test_the_sample_a_worker_died_under_is_named(worker: Worker) -> None:
    """Results come back per chunk, so which sample was running when the worker died comes from
    the start times it shares with the server, not from the results received."""
    samples = [Sample("a", "[1]"), Sample("slow", SLOW), Sample("b", "[2]")]
    scorer = json_scorer(UNIQUE, timeout_s=60).SerializeToString()

    async def body() -> None:
        call = asyncio.ensure_future(worker.score(scorer, samples, 60, time.monotonic() + 60))
        await until(lambda: worker.starts[1], what="the slow sample started")
        os.kill(worker.pid, signal.SIGKILL)
        reply = await asyncio.wait_for(call, 10)
        assert reply.stop is Stop.DIED and reply.running == 1
        assert [o.status for o, _ in reply.results] in ([], [Status.OK])

    asyncio.run(body())


@pytest.mark.slow  # waits out a request deadline
def test_results_finished_before_a_stuck_sample_survive_the_deadline() -> None:
    scorer = json_scorer(UNIQUE, timeout_s=60)

    async def body() -> None:
        runner = RuleRunner(1)
        try:
            await runner.warm_up()
            samples = [Sample("a", "[1, 2]"), Sample("b", "[1, 1]"), Sample("slow", SLOW)]
            start = time.monotonic()
            results = await runner.run(scorer, samples, timeout_s=60, deadline=start + 1.5)
            assert time.monotonic() - start < 6  # the deadline and a kill, not the 60 s timeout
            assert statuses(results) == ["OK", "OK", "TIMEOUT"]
            assert [o.raw for o, _ in results[:2]] == [1.0, 0.0]
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # spawns a rule worker: seconds
def test_a_worker_given_back_stops_between_samples_or_is_reclaimed(worker: Worker) -> None:
    """give_back: the worker stops before its next sample (YIELDED, with the results so far),
    and before the first one of later chunks until keep(); a sample still running after the
    grace period ends the call RECLAIMED, naming that sample."""
    scorer = json_scorer(UNIQUE, timeout_s=60).SerializeToString()

    async def body() -> None:
        samples = [Sample(f"m{i}", MEDIUM) for i in range(20)]
        call = asyncio.ensure_future(worker.score(scorer, samples, 60, time.monotonic() + 60))
        await until(lambda: worker.starts[2], what="the third sample started")
        worker.give_back(30.0)
        reply = await asyncio.wait_for(call, 10)
        assert reply.stop is Stop.YIELDED and 3 <= len(reply.results) < 20
        assert {o.status for o, _ in reply.results} == {Status.OK}
        quick = [Sample("q", "[1]")]
        again = await worker.score(scorer, quick, 60, time.monotonic() + 60)
        assert again.stop is Stop.YIELDED and again.results == []  # asked until withdrawn
        worker.keep()
        again = await worker.score(scorer, quick, 60, time.monotonic() + 60)
        assert again.stop is Stop.DONE and again.results[0][0].raw == 1.0

        stuck = [Sample("a", "[1]"), Sample("slow", SLOW), Sample("b", "[2]")]
        sent = time.monotonic()
        call = asyncio.ensure_future(worker.score(scorer, stuck, 60, sent + 60))
        await until(lambda: worker.starts[1] > sent, what="the slow sample started")
        start = time.monotonic()
        worker.give_back(0.3)
        reply = await asyncio.wait_for(call, 10)
        assert reply.stop is Stop.RECLAIMED and reply.running == 1
        assert 0.3 <= time.monotonic() - start < 3

    asyncio.run(body())
