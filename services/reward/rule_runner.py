"""Runs rule scorers off the event loop: in worker processes this module owns or, with zero
workers, in a thread.

Why not a ProcessPoolExecutor: it cannot stop one task, so a CPU-bound sample (a huge JSON
array under `uniqueItems`, a slow sympy simplification) holds its worker for good and every
later sample, of every team, queues behind it. Here each spawned worker (`rule_worker.py`)
takes one chunk at a time and sends its results back in one message, while the server sees each
sample start through shared memory. A sample still running after its scorer's timeout, or at the
request's deadline, gets its worker SIGKILLed and replaced; it comes back TIMEOUT and the rest of
its chunk goes on in another worker. Scorers run in a worker's main thread, where
math-verify's signal-based timeouts work, and each worker imports math_verify before it takes
work.

Workers are shared fairly between teams (`Pool`) without leaving one idle while a team waits:
a free worker goes to the waiting team that holds the fewest. When a team that holds none comes
and finds none free (nor starting), a team holding several gives one back (`Worker.give_back`):
the worker stops before its next sample and the rest of that chunk queues again, or, if its
sample still runs RECLAIM_GRACE_S later, it is killed and the sample scored again elsewhere. So
one team's slow samples (a spec may set a per-sample timeout of minutes) cannot queue every
other team's chunks behind them: a team holding none waits about a sample, or RECLAIM_GRACE_S
plus a worker's start (1-2 s), while workers starting count as its own. A team alone uses every
worker. A call's samples are split between the workers in chunks of at least MIN_CHUNK_S of
expected scoring (from what the scorer's samples took so far).

A thread cannot be killed: with zero workers an overrunning chunk comes back TIMEOUT but keeps
its thread (and a CPU) busy until it ends, and a sample whose scoring sits in one long C call
(sympy's big-integer power for `$9^{9^{9^9}}$`) holds the GIL meanwhile, stalling the whole
server: zero workers is for trusted input only (the runner logs a warning).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from services.reward.domain import Outcome, Sample, Status
from services.reward.rule_pool import Pool
from services.reward.rule_worker import (
    CHUNK,
    REAP_TIMEOUT_S,
    Reply,
    Result,
    Stop,
    Worker,
    score_timed,
)
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward.rules")

# Rules whose cost is linear in the text and bounded by it (RE2 regexes, string scans, no sympy
# and no JSON Schema): a call with this few characters of them is scored on the caller's
# thread, where a hand-off to a thread or a worker would cost more than the scoring.
INLINE_RULES = frozenset({"exact_match", "contains", "regex", "length", "format"})
INLINE_MAX_CHARS = 64 * 1024
# A call's samples go to another worker in a chunk of their own when it carries at least this
# much expected scoring: a hand-off (a message each way, two wake-ups, the worker's cold caches,
# both cores busy at once) costs about half a millisecond and slows the other core. Measured
# (bench/reward_throughput.py, 2 workers, against in-process): 16 math samples of 0.55 ms in 2
# chunks of 4.4 ms, 0.89-0.95 (one chunk: 0.77-0.79); 16 of 0.35 ms in 2 of 2.8 ms, 0.60 (one:
# 0.70); 32 of 0.35 ms in 2 of 5.6 ms, 1.22-1.42 (one: 0.83).
MIN_CHUNK_S = 0.004
# What a sample of a scorer not measured yet is expected to take: 16 make a chunk.
FIRST_GUESS_S = MIN_CHUNK_S / 16
COST_WEIGHT = 0.2  # of a call's mean seconds per sample in its scorer's running estimate
COSTS_KEPT = 256  # scorers whose cost per sample is remembered (the oldest forgotten first)
# A worker not ready by then (spawn, imports, math_verify) is killed and started again.
START_TIMEOUT_S = 120.0
# A worker starting counts as on its way to a team waiting for one (no worker is asked back for
# it) for this long; they start in 1-2 s.
START_EXPECTED_S = 10.0
RESTART_DELAY_S = 1.0


def inline(scorer: ev.ScorerSpec, samples: Sequence[Sample]) -> bool:
    """Cheap enough to score on the calling thread (see INLINE_RULES)."""
    if scorer.WhichOneof("scorer") not in INLINE_RULES:
        return False
    chars = 0
    for sample in samples:
        chars += len(sample.completion) + sum(_text_size(v) for v in sample.metadata.values())
        if chars > INLINE_MAX_CHARS:
            return False
    return True


def _text_size(value: Any) -> int:
    """Characters a rule may scan in a metadata value (a reference, a list of substrings)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 8 if isinstance(value, int | float | bool) or value is None else INLINE_MAX_CHARS


def chunk_size(n: int, per_sample_s: float, workers: int) -> int:
    """Samples per chunk for a call of `n`: spread over as many workers as each get MIN_CHUNK_S
    of expected scoring, one chunk at least, CHUNK samples at most.

    >>> chunk_size(16, 0.00055, 2), chunk_size(16, 0.00035, 2), chunk_size(32, 0.00035, 2)
    (8, 16, 16)
    >>> chunk_size(200, 0.00055, 2), chunk_size(3, 0.08, 8), chunk_size(5, 1.0, 0)
    (64, 1, 5)
    """
    parts = max(1, min(workers, int(n * per_sample_s / MIN_CHUNK_S)))
    return min(CHUNK, -(-n // parts))


class Costs:
    """Seconds per sample of each team's scorers (by team and serialized spec), for
    `chunk_size`: an exponential moving average (weight COST_WEIGHT) of what the samples took
    when their call ran alone (one chunk, no other worker busy). A call spread over several
    workers measures the samples slower than they are alone (both cores busy), which would
    keep a scorer split once it was; so such a call may only lower an estimate, and starts
    none. One observation counts for at most MIN_CHUNK_S a sample (from there on a call is
    spread as far as it goes whatever the cost): one slow call cannot keep a team's calls
    split for long."""

    def __init__(self) -> None:
        self._per_sample: dict[tuple[str, bytes], float] = {}

    def expected(self, team: str, payload: bytes) -> float:
        return self._per_sample.get((team, payload), FIRST_GUESS_S)

    def observe(self, team: str, payload: bytes, results: Sequence[Result], alone: bool) -> None:
        """Samples that timed out or whose worker died say nothing of the cost."""
        seconds = [t for o, t in results if o.status is not Status.TIMEOUT and t > 0]
        if not seconds:
            return
        mean = min(sum(seconds) / len(seconds), MIN_CHUNK_S)
        key = (team, payload)
        old = self._per_sample.pop(key, None)
        if old is None:
            if not alone:
                return  # a first estimate from a split call would start high and stay there
            new = mean
        else:
            new = old + COST_WEIGHT * (mean - old)
            if not alone:
                new = min(new, old)
        self._per_sample[key] = new  # last, so the least recently seen is forgotten first
        if len(self._per_sample) > COSTS_KEPT:
            del self._per_sample[next(iter(self._per_sample))]


def _timeout(why: str, seconds: float, n: int) -> list[Result]:
    return [(Outcome.timeout(why), max(seconds, 0.0))] * n


def _fill(results: list[Result | None], missing: Result) -> list[Result]:
    """`results` with `missing` for each sample that has none."""
    return [missing if r is None else r for r in results]


class RuleRunner:
    """`workers` spawned processes (0: a thread) that run rule scorers with deadlines."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        # spawn, not fork: the server process runs gRPC threads.
        self._context = multiprocessing.get_context("spawn")
        # The workers: free, busy (by team), asked back, starting (see Pool).
        self._pool = Pool()
        self._costs = Costs()  # what each scorer's samples take, to size chunks
        self._live: set[Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._started = self._closed = False
        # Blocking pipe I/O: start-up waits, large sends and reaping.
        self._io = ThreadPoolExecutor(2 * workers + 2, thread_name_prefix="tlm-rule-io")
        if workers <= 0:
            log.warning(
                "rule_scorers_in_server_thread",
                why="rule_workers is 0: one hostile sample can stall the server; "
                "for trusted input only",
            )

    def worker_pids(self) -> list[int]:
        """Processes started and not yet retired (for logs and tests)."""
        return sorted(w.pid for w in self._live)

    async def warm_up(self) -> None:
        """Start the workers and wait until each has imported math_verify."""
        self._start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self._pool.free) < self._workers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run(
        self,
        scorer: ev.ScorerSpec,
        samples: Sequence[Sample],
        *,
        timeout_s: float,
        deadline: float,
        team: str = "",
    ) -> list[Result]:
        """Every sample's outcome, in order: scored, TIMEOUT (over `timeout_s`, or unfinished at
        `deadline`, a time.monotonic() value) or ERROR (its worker died twice). Workers are
        shared fairly between `team`s (see the module docstring)."""
        if not samples:
            return []
        if inline(scorer, samples):
            # One turn of the loop first: the engine starts the call's other scorers before
            # this one, and a call split into chunks sends them from tasks of their own, which
            # then go out before this scoring holds the loop (Engine.score).
            await asyncio.sleep(0)
            return [score_timed(scorer, sample) for sample in samples]
        self._start()
        payload = scorer.SerializeToString()
        size = chunk_size(len(samples), self._costs.expected(team, payload), self._workers)
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        alone = len(chunks) == 1 and not self._pool.busy  # measures the solo cost
        score = self._in_thread if self._workers <= 0 else self._in_workers
        if len(chunks) == 1:  # sent before the first yield to the loop (see Engine.score)
            results = await score(payload, chunks[0], timeout_s, deadline, team)
        else:
            parts = await asyncio.gather(
                *(score(payload, c, timeout_s, deadline, team) for c in chunks)
            )
            results = [item for part in parts for item in part]
        if self._workers > 0:  # the cost only sizes chunks for workers
            self._costs.observe(team, payload, results, alone)
        return results

    def close(self) -> None:
        """Kill every worker, running or not, and return within about REAP_TIMEOUT_S."""
        self._closed = True
        for task in self._starting:
            task.cancel()
        workers, self._live = list(self._live), set()
        for worker in workers:
            worker.kill()
        end = time.monotonic() + REAP_TIMEOUT_S
        for worker in workers:
            worker.process.join(max(end - time.monotonic(), 0.0))
        self._pool.close()  # the killed workers are dropped; waiters get None
        self._io.shutdown(wait=False, cancel_futures=True)
        log.info("rule_runner_closed", killed=len(workers))

    # Zero workers: a thread ----------------------------------------------------------------

    async def _in_thread(
        self, payload: bytes, chunk: Sequence[Sample], timeout_s: float, deadline: float, team: str
    ) -> list[Result]:
        scorer = ev.ScorerSpec.FromString(payload)
        done: list[Result] = []  # appended by the thread, read here at the deadline

        def work() -> None:
            for sample in chunk:
                done.append(score_timed(scorer, sample))

        future = asyncio.get_running_loop().run_in_executor(None, work)
        limit = min(deadline - time.monotonic(), timeout_s * len(chunk))
        try:
            await asyncio.wait_for(asyncio.shield(future), max(limit, 0.001))
        except TimeoutError:
            log.warning("rule_thread_overran", seconds=round(limit, 3), samples=len(chunk))
        finished = done[: len(chunk)]
        why = f"no result within {max(limit, 0.0):.3g}s"
        return finished + _timeout(why, limit, len(chunk) - len(finished))

    # Worker processes -------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._started and self._workers > 0:
            self._started = True
            for _ in range(self._workers):
                self._start_one()

    def _start_one(self) -> None:
        """Start a worker, counted by the pool as coming (`Pool.expect`) from now."""
        if self._closed:
            return
        self._pool.expect()
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _spawn(self) -> None:
        """Start a worker and offer it once ready; on failure wait and try again. The pool
        counts it as coming (teams waiting for it ask no worker back) until it fails once or
        has taken START_EXPECTED_S: a start that hangs must not stall the give-back."""
        loop = asyncio.get_running_loop()
        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._pool.gave_up()

        late = loop.call_later(START_EXPECTED_S, uncount)
        try:
            while not self._closed:
                started = time.monotonic()
                try:
                    worker = Worker(self._context)
                except Exception:  # out of processes or memory: try again later
                    log.exception("rule_worker_spawn_failed")
                    uncount()
                    await asyncio.sleep(RESTART_DELAY_S)
                    continue
                self._live.add(worker)
                ready = await loop.run_in_executor(self._io, worker.wait_ready, START_TIMEOUT_S)
                if ready and not self._closed:
                    seconds = round(time.monotonic() - started, 3)
                    log.info("rule_worker_started", pid=worker.pid, seconds=seconds)
                    self._pool.add(worker, expected=counted)
                    return
                log.error(
                    "rule_worker_start_failed", pid=worker.pid, exitcode=worker.process.exitcode
                )
                self._retire(worker)
                uncount()
                await asyncio.sleep(RESTART_DELAY_S)
        finally:
            late.cancel()

    def _retire(self, worker: Worker) -> None:
        """Kill and reap `worker` (off the loop) once no thread uses it."""
        worker.kill()
        self._live.discard(worker)
        if not self._closed:
            self._io.submit(worker.reap)

    def _replace(self, worker: Worker) -> None:
        self._retire(worker)
        self._start_one()

    async def _in_workers(
        self, payload: bytes, chunk: Sequence[Sample], timeout_s: float, deadline: float, team: str
    ) -> list[Result]:
        """The chunk's results; after a kill or a crash the rest goes on in another worker."""
        results: list[Result | None] = [None] * len(chunk)
        crashed: set[int] = set()  # samples whose worker died under them once already
        kept = False  # a sample of it was killed to give its worker back once
        while todo := [i for i, r in enumerate(results) if r is None]:
            if time.monotonic() >= deadline:
                return _fill(results, _timeout("the request deadline passed", 0.0, 1)[0])
            worker = await self._pool.acquire(team, deadline - time.monotonic(), kept=kept)
            if worker is None:
                return _fill(results, self._unserved(1)[0])
            rest = [chunk[i] for i in todo]
            reply = await self._call(worker, team, payload, rest, timeout_s, deadline)
            for i, result in zip(todo, reply.results, strict=False):
                results[i] = result
            if reply.stop is Stop.DEADLINE:
                return _fill(results, _timeout("the request deadline passed", 0.0, 1)[0])
            if reply.stop is Stop.RECLAIMED:
                kept = True  # killed to give its worker back: not the sample's fault
            if reply.stop in (Stop.DONE, Stop.YIELDED, Stop.RECLAIMED):
                continue
            running = todo[reply.running]
            if reply.stop is Stop.OVERRAN:
                why = f"no result within {timeout_s:.3g}s; its rule worker was killed"
                results[running] = _timeout(why, timeout_s, 1)[0]
            elif running in crashed:
                results[running] = (Outcome.error("rule worker crashed"), 0.0)
            else:
                # Retried once: the OOM killer or an operator may have hit an innocent sample.
                crashed.add(running)
        return [r for r in results if r is not None]  # every one is set by now

    def _unserved(self, n: int) -> list[Result]:
        if self._closed:
            return [(Outcome.error("the reward service is stopping"), 0.0)] * n
        return _timeout("no rule worker was free before the deadline", 0.0, n)

    async def _call(
        self, worker: Worker, team: str, payload: bytes, rest: Sequence[Sample],
        timeout_s: float, deadline: float,
    ) -> Reply:  # fmt: skip
        call = asyncio.ensure_future(worker.score(payload, rest, timeout_s, deadline, self._io))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller went away mid-chunk: nobody wants the rest of this work. The call sees
            # the worker die and ends; then nothing uses its pipe any more.
            worker.kill()
            self._start_one()  # its replacement, counted before the release asks for more
            self._pool.release(team, worker, reuse=False)
            call.add_done_callback(lambda _: self._retire(worker))
            raise
        alive = reply.stop in (Stop.DONE, Stop.YIELDED)
        if alive and not self._closed:
            self._pool.release(team, worker, reuse=True)
        else:
            if not alive:
                log.warning(
                    "rule_worker_killed", pid=worker.pid, why=reply.stop.value,
                    done=len(reply.results), running=reply.running,
                )  # fmt: skip
            self._replace(worker)  # the replacement is counted before the release
            self._pool.release(team, worker, reuse=False)
        return reply
