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

A thread cannot be killed: with zero workers an overrunning chunk comes back TIMEOUT but keeps
its thread (and a CPU) busy until it ends.
"""

from __future__ import annotations

import asyncio
import enum
import multiprocessing
import signal
import time
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


class RuleRunner:
    """`workers` spawned processes (0: a thread) that run rule scorers with deadlines."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        # spawn, not fork: the server process runs gRPC threads.
        self._context = multiprocessing.get_context("spawn")
        # Ready, unused workers; None once closed (each waiter passes it on).
        self._idle: asyncio.Queue[Worker | None] = asyncio.Queue()
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
        while self._idle.qsize() < self._workers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], *, timeout_s: float, deadline: float
    ) -> list[Result]:
        """Every sample's outcome, in order: scored, TIMEOUT (over `timeout_s`, or unfinished at
        `deadline`, a time.monotonic() value) or ERROR (its worker died twice)."""
        self._start()
        payload = scorer.SerializeToString()
        chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
        score = self._in_thread if self._workers <= 0 else self._in_workers
        parts = await asyncio.gather(*(score(payload, c, timeout_s, deadline) for c in chunks))
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
        while not self._idle.empty():  # killed above; waiters must not pick them up
            self._idle.get_nowait()
        self._idle.put_nowait(None)
        self._io.shutdown(wait=False, cancel_futures=True)
        log.info("rule_runner_closed", killed=len(workers))

    # Zero workers: a thread ----------------------------------------------------------------

    async def _in_thread(
        self, payload: bytes, chunk: Sequence[Sample], timeout_s: float, deadline: float
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
                self._idle.put_nowait(worker)
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

    async def _acquire(self, deadline: float) -> Worker | None:
        try:
            worker = await asyncio.wait_for(self._idle.get(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            return None
        if worker is None:
            self._idle.put_nowait(None)  # closed: let the next waiter see it too
        return None if self._closed else worker

    async def _in_workers(
        self, payload: bytes, chunk: Sequence[Sample], timeout_s: float, deadline: float
    ) -> list[Result]:
        """The chunk's results; after a kill or a crash the rest goes on in another worker."""
        results: list[Result] = []
        crashed_at = -1  # the sample whose worker died under it once already
        while len(results) < len(chunk):
            rest = chunk[len(results) :]
            if time.monotonic() >= deadline:
                return results + _timeout("the request deadline passed", 0.0, len(rest))
            worker = await self._acquire(deadline)
            if worker is None:
                return results + self._unserved(len(rest))
            got, stop = await self._call(worker, payload, rest, timeout_s, deadline)
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
        self, worker: Worker, payload: bytes, rest: Sequence[Sample], timeout_s: float,
        deadline: float,
    ) -> tuple[list[Result], Stop]:  # fmt: skip
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._io, worker.score, payload, rest, timeout_s, deadline)
        try:
            got, stop = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller went away mid-chunk: nobody wants the rest of this work.
            worker.kill()
            future.add_done_callback(lambda _: self._replace(worker))
            raise
        if stop is Stop.DONE and not self._closed:
            self._idle.put_nowait(worker)
        else:
            if stop is not Stop.DONE:
                log.warning("rule_worker_killed", pid=worker.pid, why=stop.value, done=len(got))
            self._replace(worker)
        return got, stop
