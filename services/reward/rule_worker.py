"""A rule worker: a spawned process that scores one chunk of samples at a time, and the server's
handle on it (`Worker`), driven by the rule runner on its event loop.

One message per chunk each way. The server sends (scorer, samples, deadline); the worker sends
the chunk's results back in one list when it is done. A message per sample woke the server once
per sample, and on a host with busy cores each wake-up could cost the worker its core: batch 16
of math-verify with 2 workers ran at 0.73 of in-process. Results finished FLUSH_S ago go out
early (a helper thread), and so does each one within FLUSH_S of the deadline, so a sample that
never ends does not hold back those finished before it.

The server still sees each sample start without a message: the worker writes time.monotonic()
(CLOCK_MONOTONIC, one clock for every process of the host) into the sample's slot of an array
it shares with the server before scoring it. The server sleeps until the running sample's start
plus its timeout (or the deadline), then reads which sample that is. A killed worker loses the
results it had not sent yet (under FLUSH_S of work): those samples are scored again elsewhere.

The server can also ask for a worker back mid-chunk (`Worker.give_back`: a team holding several
gives one to a team holding none): a flag in shared memory the worker reads before each sample.
It then sends what it has and YIELDED, and takes the next chunk; one whose sample is still
running a grace period later is killed instead (Stop.RECLAIMED).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

from services.reward.domain import Outcome, Sample
from services.reward.rules import score_rule
from tlm.reward.v1 import evaluator_pb2 as ev

CHUNK = 64  # samples per message, and slots in the shared start-time array
# A send wakes the server's event loop; where cores are busy that can cost the worker a scheduler
# slice (a few ms). Results wait at most about 2 x 100 ms before they are sent (then at most ten
# extra sends a second), and a kill loses at most that much scoring.
FLUSH_S = 0.1
# SIGKILLed processes exit at once; this only bounds a process stuck in the kernel.
REAP_TIMEOUT_S = 2.0
READY = "ready"
YIELDED = "yielded"  # sent after the results of a chunk given back before its end
# The worker has read the previous chunk before it sends that chunk's last results, so the
# server's socket buffer is empty when it sends the next: a message this small goes out at once.
SEND_INLINE_BYTES = 64 * 1024

Result = tuple[Outcome, float]  # (outcome, seconds it took)


def score_timed(scorer: ev.ScorerSpec, sample: Sample) -> Result:
    start = time.perf_counter()
    outcome = score_rule(scorer, sample)
    return outcome, time.perf_counter() - start


def run_chunk(scorer_bytes: bytes, samples: Sequence[Sample]) -> list[Result]:
    """One scorer over a chunk of samples, with per-sample latency."""
    scorer = ev.ScorerSpec.FromString(scorer_bytes)
    return [score_timed(scorer, sample) for sample in samples]


class _Outbox:
    """Results of the running chunk not sent yet. The main thread adds them and sends what is
    left at the end of the chunk (and after each sample once within FLUSH_S of the deadline); a
    helper thread sends results that have waited FLUSH_S, so one sample that never ends does not
    hold back those finished before it (the server keeps them at the deadline)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.pending: list[Result] = []
        self.since = 0.0  # when the oldest pending result was added

    def add(self, result: Result) -> None:
        with self.lock:
            if not self.pending:
                self.since = time.monotonic()
            self.pending.append(result)

    def send(self, older_than: float = 0.0) -> None:
        with self.lock:
            if self.pending and time.monotonic() - self.since >= older_than:
                self.conn.send(self.pending)
                self.pending = []

    def send_late(self) -> None:
        """The helper thread. It polls rather than being woken per result: a wake-up while the
        main thread scores costs that thread the GIL, and chunks are far more frequent."""
        while True:
            time.sleep(FLUSH_S)
            self.send(older_than=FLUSH_S)


def worker_main(conn: Connection, starts: Any, wanted: Any) -> None:
    """The worker process: one chunk at a time; `starts[i]` is when sample i of it started, and
    a set `wanted` asks for the worker back before the next sample."""
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import math_verify  # noqa: F401  # import sympy before taking work, not on the first request

    outbox = _Outbox(conn)
    threading.Thread(target=outbox.send_late, name="tlm-rule-outbox", daemon=True).start()
    conn.send(READY)
    while True:
        try:
            scorer_bytes, samples, deadline = conn.recv()
        except EOFError:  # the server closed the pipe, or died
            return
        scorer = ev.ScorerSpec.FromString(scorer_bytes)
        for i, sample in enumerate(samples):
            if wanted.value:
                outbox.send()
                conn.send(YIELDED)
                break
            starts[i] = time.monotonic()
            outbox.add(score_timed(scorer, sample))
            if time.monotonic() >= deadline - FLUSH_S:
                outbox.send()
        else:
            outbox.send()


class Stop(enum.Enum):
    """Why a worker stopped sending results for a chunk."""

    DONE = "done"
    OVERRAN = "overran"  # a sample took longer than its timeout
    DEADLINE = "deadline"  # the request's deadline came
    DIED = "died"  # the process ended (OOM killer, SIGKILL, crash)
    YIELDED = "yielded"  # given back before the chunk's end (give_back), alive and free
    RECLAIMED = "reclaimed"  # given back by a kill: its sample ran past the grace period


class Reply(NamedTuple):
    """The results that came back (in order, from the first sample), why they stopped, and for
    OVERRAN, DIED and RECLAIMED the index of the sample the worker was running then."""

    results: list[Result]
    stop: Stop
    running: int


class Worker:
    """A spawned process, the server's end of its pipe and the shared start times. `wait_ready`
    and `reap` block (the runner's I/O threads run them); `score` runs on the event loop. One
    call at a time per worker."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.starts = context.RawArray(ctypes.c_double, CHUNK)
        self.wanted = context.RawValue(ctypes.c_int, 0)
        self.process = context.Process(
            target=worker_main,
            args=(child, self.starts, self.wanted),
            name="tlm-rule-worker",
            daemon=True,
        )
        self.process.start()
        child.close()  # else this end never sees EOF when the worker dies
        self.pid: int = self.process.pid
        self._asked: float | None = None  # the grace of a give_back not withdrawn (keep)
        # While score() runs: start and cancel its grace timer.
        self._grace: tuple[Callable[[float], None], Callable[[], None]] | None = None

    def wait_ready(self, timeout: float) -> bool:
        try:
            return bool(self.conn.poll(timeout)) and self.conn.recv() == READY
        except (EOFError, OSError):
            return False

    def score(
        self,
        payload: bytes,
        samples: Sequence[Sample],
        timeout_s: float,
        deadline: float,
        io: Executor | None = None,
    ) -> Coroutine[Any, Any, Reply]:
        """Sends the chunk now and returns the coroutine that awaits its Reply: results in order
        until all arrived, a sample overran, the deadline came (deadline is a time.monotonic()
        value), the worker died, or it was asked back (`give_back`: YIELDED before a sample,
        RECLAIMED after the grace). At most CHUNK samples. Sending before the first await lets
        the caller do other work (cheap scorers) while the worker scores. The coroutine runs on
        the event loop, which reads the replies as they come (no thread hand-off); a message too
        large to be sure the send cannot block goes out from an `io` thread (default: the
        loop's)."""
        loop = asyncio.get_running_loop()
        n = len(samples)
        ctypes.memset(self.starts, 0, n * ctypes.sizeof(ctypes.c_double))
        message = ForkingPickler.dumps((payload, list(samples), deadline))
        sent = time.monotonic()
        sending: asyncio.Future[None] | None = None
        try:
            if len(message) <= SEND_INLINE_BYTES:
                self.conn.send_bytes(message)
            else:
                sending = loop.run_in_executor(io, self.conn.send_bytes, message)
        except OSError as exc:  # the reply says DIED, as for a send from the io thread
            sending = loop.create_future()
            sending.set_exception(exc)
        return self._replies(n, timeout_s, deadline, sent, sending)

    async def _replies(
        self,
        n: int,
        timeout_s: float,
        deadline: float,
        sent: float,
        sending: asyncio.Future[None] | None,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        if sending is not None:
            try:
                await sending
            except OSError:
                return Reply([], Stop.DIED, 0)
        reply: asyncio.Future[Reply] = loop.create_future()
        results: list[Result] = []
        timer: asyncio.TimerHandle | None = None
        grace: asyncio.TimerHandle | None = None

        def finish(stop: Stop, running: int) -> None:
            if not reply.done():
                reply.set_result(Reply(list(results), stop, running))

        def check() -> None:
            """Wakes at the running sample's timeout or the deadline, whichever comes first."""
            nonlocal timer
            readable()  # results already here count, whatever the time
            if reply.done():
                return
            running, started = self._running(len(results), n, sent)
            now = time.monotonic()
            if now >= deadline:
                finish(Stop.DEADLINE, running)
            elif now - started >= timeout_s:
                finish(Stop.OVERRAN, running)
            else:
                timer = loop.call_later(min(started + timeout_s, deadline) - now, check)

        def readable() -> None:
            try:
                while not reply.done() and len(results) < n and self.conn.poll(0):
                    message = self.conn.recv()
                    if message == YIELDED:
                        finish(Stop.YIELDED, len(results))
                    else:
                        results.extend(message)
            except (EOFError, OSError):
                finish(Stop.DIED, self._running(len(results), n, sent)[0])
            if len(results) >= n:
                finish(Stop.DONE, n)

        def overdue() -> None:
            readable()
            finish(Stop.RECLAIMED, self._running(len(results), n, sent)[0])

        def arm(grace_s: float) -> None:
            nonlocal grace
            if grace is None:
                grace = loop.call_later(grace_s, overdue)

        def disarm() -> None:
            nonlocal grace
            if grace is not None:
                grace.cancel()
                grace = None

        loop.add_reader(self.conn.fileno(), readable)
        self._grace = (arm, disarm)
        if self._asked is not None:  # asked back between its hand-out and this call
            arm(self._asked)
        check()
        try:
            return await reply
        finally:
            self._grace = None
            loop.remove_reader(self.conn.fileno())
            for handle in (timer, grace):
                if handle is not None:
                    handle.cancel()

    def give_back(self, grace_s: float) -> None:
        """Ask for the worker before its chunk ends: it stops before its next sample (the call
        ends YIELDED, the worker free), or `grace_s` later the call ends RECLAIMED (the sample
        still running; the caller kills the worker). Asked between calls, the next call yields
        before its first sample. Holds until `keep`. On the event loop."""
        self.wanted.value = 1
        self._asked = grace_s
        if self._grace is not None:
            self._grace[0](grace_s)

    def keep(self) -> None:
        """Withdraw a give_back (no longer needed, or the worker is handed out again)."""
        self.wanted.value = 0
        self._asked = None
        if self._grace is not None:
            self._grace[1]()

    def _running(self, received: int, n: int, sent: float) -> tuple[int, float]:
        """The sample the worker is on (the last one it started, of those not received) and when
        it started; the first not received and the send time when it started none yet."""
        for i in range(n - 1, received - 1, -1):
            if started := self.starts[i]:
                return i, started
        return received, sent

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()

    def reap(self) -> None:
        """After kill(), once no thread uses the pipe any more."""
        self.process.join(REAP_TIMEOUT_S)
        self.conn.close()
