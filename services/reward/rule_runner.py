"""Runs rule scorers off the event loop: in worker processes this module owns or, with zero
workers, in a thread.

Why not a ProcessPoolExecutor: it cannot stop one task, so a CPU-bound sample (a huge JSON
array under `uniqueItems`, a slow sympy simplification) holds its worker for good and every
later sample, of every team, queues behind it. Here each spawned worker takes one chunk at a
time and sends back one result per sample. A sample still running after its scorer's timeout,
or at the request's deadline, gets its worker SIGKILLed and replaced; it comes back TIMEOUT and
the rest of its chunk goes on in another worker. Scorers run in a worker's main thread, where
math-verify's signal-based timeouts work, and each worker imports math_verify before it takes
work.

Workers are shared fairly between teams (`_Pool`): a free worker goes to the waiting team that
holds the fewest, and a team that already holds a worker never takes the last free one. So one
team's slow samples (a spec may set a per-sample timeout of minutes) cannot queue every other
team's chunks behind them: while workers > 1, a team that holds none finds one free or gets the
next one that frees. The price: a team alone uses at most workers - 1 of them.

A thread cannot be killed: with zero workers an overrunning chunk comes back TIMEOUT but keeps
its thread (and a CPU) busy until it ends.
"""

from __future__ import annotations

import asyncio
import enum
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import structlog

from services.reward.domain import Outcome, Sample
from services.reward.rules import score_rule
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward.rules")

CHUNK = 64
# Rules whose cost is linear in the text and bounded by it (RE2 regexes, string scans, no sympy
# and no JSON Schema): a call with this few characters of them is scored on the caller's
# thread, where a hand-off to a thread or a worker would cost more than the scoring.
INLINE_RULES = frozenset({"exact_match", "contains", "regex", "length", "format"})
INLINE_MAX_CHARS = 64 * 1024
# A worker not ready by then (spawn, imports, math_verify) is killed and started again.
START_TIMEOUT_S = 120.0
RESTART_DELAY_S = 1.0
# SIGKILLed processes exit at once; this only bounds a process stuck in the kernel.
REAP_TIMEOUT_S = 2.0
READY = "ready"

Result = tuple[Outcome, float]  # (outcome, seconds it took)


def score_timed(scorer: ev.ScorerSpec, sample: Sample) -> Result:
    start = time.perf_counter()
    outcome = score_rule(scorer, sample)
    return outcome, time.perf_counter() - start


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


def run_chunk(scorer_bytes: bytes, samples: Sequence[Sample]) -> list[Result]:
    """One scorer over a chunk of samples, with per-sample latency."""
    scorer = ev.ScorerSpec.FromString(scorer_bytes)
    return [score_timed(scorer, sample) for sample in samples]


def worker_main(conn: Connection) -> None:
    """A worker process: one chunk at a time, one message per scored sample."""
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import math_verify  # noqa: F401  # import sympy before taking work, not on the first request

    conn.send(READY)
    while True:
        try:
            scorer_bytes, samples = conn.recv()
        except EOFError:  # the server closed the pipe, or died
            return
        scorer = ev.ScorerSpec.FromString(scorer_bytes)
        for sample in samples:
            conn.send(score_timed(scorer, sample))


class Stop(enum.Enum):
    """Why a worker stopped sending results for a chunk."""

    DONE = "done"
    OVERRAN = "overran"  # a sample took longer than its timeout
    DEADLINE = "deadline"  # the request's deadline came
    DIED = "died"  # the process ended (OOM killer, SIGKILL, crash)


class Worker:
    """A spawned process and the server's end of its pipe. `wait_ready` and `score` block: they
    run in the runner's I/O threads, one at a time per worker."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(child,), name="tlm-rule-worker", daemon=True
        )
        self.process.start()
        child.close()  # else this end never sees EOF when the worker dies
        self.pid: int = self.process.pid

    def wait_ready(self, timeout: float) -> bool:
        try:
            return bool(self.conn.poll(timeout)) and self.conn.recv() == READY
        except (EOFError, OSError):
            return False

    def score(
        self, payload: bytes, samples: Sequence[Sample], timeout_s: float, deadline: float
    ) -> tuple[list[Result], Stop]:
        """Results in order until all arrived, one is late, or the worker dies."""
        results: list[Result] = []
        try:
            self.conn.send((payload, list(samples)))
            while len(results) < len(samples):
                left = deadline - time.monotonic()
                if not self.conn.poll(max(min(timeout_s, left), 0.0)):
                    return results, Stop.OVERRAN if left > timeout_s else Stop.DEADLINE
                results.append(self.conn.recv())
        except (EOFError, OSError):
            return results, Stop.DIED
        return results, Stop.DONE

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()

    def reap(self) -> None:
        """After kill(), once no thread uses the pipe any more."""
        self.process.join(REAP_TIMEOUT_S)
        self.conn.close()


def _timeout(why: str, seconds: float, n: int) -> list[Result]:
    return [(Outcome.timeout(why), max(seconds, 0.0))] * n


class _Pool:
    """Ready workers and the teams waiting for one; runs on the event loop only."""

    def __init__(self) -> None:
        self.free: list[Worker] = []
        self.held: dict[str, int] = {}  # workers each team is using now
        # Waiting calls per team; dict order is the order teams are served in on a tie.
        self.waiting: dict[str, deque[asyncio.Future[Worker | None]]] = {}
        self.closed = False

    def _may_take(self, team: str) -> bool:
        # A team holding a worker leaves the last free one to teams that hold none.
        return bool(self.free) and (len(self.free) > 1 or not self.held.get(team))

    def _take(self, team: str) -> Worker:
        self.held[team] = self.held.get(team, 0) + 1
        return self.free.pop()

    def _dispatch(self) -> None:
        while True:
            teams = [t for t in self.waiting if self._may_take(t)]
            if not teams:
                return
            team = min(teams, key=lambda t: self.held.get(t, 0))
            queue = self.waiting.pop(team)
            future = queue.popleft()
            if queue:
                self.waiting[team] = queue  # to the back of the line
            if not future.done():
                future.set_result(self._take(team))

    async def acquire(self, team: str, timeout: float) -> Worker | None:
        """A worker for `team`, or None at the timeout or once closed."""
        if self.closed:
            return None
        future: asyncio.Future[Worker | None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(team, deque()).append(future)
        self._dispatch()
        try:
            await asyncio.wait({future}, timeout=max(timeout, 0.0))
        except asyncio.CancelledError:
            self._forget(team, future)
            raise
        if future.done():
            return future.result()
        self._forget(team, future)
        return None

    def _forget(self, team: str, future: asyncio.Future[Worker | None]) -> None:
        if future.done() and not future.cancelled() and future.result() is not None:
            self.release(team, future.result())  # handed over just as the caller left
            return
        future.cancel()
        queue = self.waiting.get(team)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self.waiting[team]

    def release(self, team: str, worker: Worker | None) -> None:
        """`team` is done with a worker: `worker` is free again, or None when it was retired."""
        self.held[team] -= 1
        if not self.held[team]:
            del self.held[team]
        if worker is not None:
            self.add(worker)

    def add(self, worker: Worker) -> None:
        if self.closed:
            return
        self.free.append(worker)
        self._dispatch()

    def close(self) -> None:
        self.closed = True
        self.free.clear()
        for queue in self.waiting.values():
            for future in queue:
                if not future.done():
                    future.set_result(None)
        self.waiting.clear()


class RuleRunner:
    """`workers` spawned processes (0: a thread) that run rule scorers with deadlines."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        # spawn, not fork: the server process runs gRPC threads.
        self._context = multiprocessing.get_context("spawn")
        # Ready, unused workers, handed out fairly between teams.
        self._pool = _Pool()
        self._live: set[Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._started = self._closed = False
        # Blocking pipe I/O: a chunk and a start-up wait per worker at most, plus reaping.
        self._io = ThreadPoolExecutor(2 * workers + 2, thread_name_prefix="tlm-rule-io")

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
        if inline(scorer, samples):
            return [score_timed(scorer, sample) for sample in samples]
        self._start()
        payload = scorer.SerializeToString()
        chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
        score = self._in_thread if self._workers <= 0 else self._in_workers
        parts = await asyncio.gather(
            *(score(payload, c, timeout_s, deadline, team) for c in chunks)
        )
        return [item for part in parts for item in part]

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
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _spawn(self) -> None:
        """Start a worker and offer it once ready; on failure wait and try again."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            started = time.monotonic()
            try:
                worker = Worker(self._context)
            except Exception:  # out of processes or memory: try again later
                log.exception("rule_worker_spawn_failed")
                await asyncio.sleep(RESTART_DELAY_S)
                continue
            self._live.add(worker)
            ready = await loop.run_in_executor(self._io, worker.wait_ready, START_TIMEOUT_S)
            if ready and not self._closed:
                seconds = round(time.monotonic() - started, 3)
                log.info("rule_worker_started", pid=worker.pid, seconds=seconds)
                self._pool.add(worker)
                return
            log.error("rule_worker_start_failed", pid=worker.pid, exitcode=worker.process.exitcode)
            self._retire(worker)
            await asyncio.sleep(RESTART_DELAY_S)

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
        results: list[Result] = []
        crashed_at = -1  # the sample whose worker died under it once already
        while len(results) < len(chunk):
            rest = chunk[len(results) :]
            if time.monotonic() >= deadline:
                return results + _timeout("the request deadline passed", 0.0, len(rest))
            worker = await self._pool.acquire(team, deadline - time.monotonic())
            if worker is None:
                return results + self._unserved(len(rest))
            got, stop = await self._call(worker, team, payload, rest, timeout_s, deadline)
            results += got
            if stop is Stop.OVERRAN:
                why = f"no result within {timeout_s:.3g}s; its rule worker was killed"
                results += _timeout(why, timeout_s, 1)
            elif stop is Stop.DEADLINE:
                results += _timeout("the request deadline passed", 0.0, len(rest) - len(got))
            elif stop is Stop.DIED and crashed_at == len(results):
                results.append((Outcome.error("rule worker crashed"), 0.0))
            elif stop is Stop.DIED:
                # Retried once: the OOM killer or an operator may have hit an innocent sample.
                crashed_at = len(results)
        return results

    def _unserved(self, n: int) -> list[Result]:
        if self._closed:
            return [(Outcome.error("the reward service is stopping"), 0.0)] * n
        return _timeout("no rule worker was free before the deadline", 0.0, n)

    async def _call(
        self, worker: Worker, team: str, payload: bytes, rest: Sequence[Sample],
        timeout_s: float, deadline: float,
    ) -> tuple[list[Result], Stop]:  # fmt: skip
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._io, worker.score, payload, rest, timeout_s, deadline)
        try:
            got, stop = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller went away mid-chunk: nobody wants the rest of this work.
            worker.kill()
            self._pool.release(team, None)
            future.add_done_callback(lambda _: self._replace(worker))
            raise
        if stop is Stop.DONE and not self._closed:
            self._pool.release(team, worker)
        else:
            self._pool.release(team, None)
            if stop is not Stop.DONE:
                log.warning("rule_worker_killed", pid=worker.pid, why=stop.value, done=len(got))
            self._replace(worker)
        return got, stop
