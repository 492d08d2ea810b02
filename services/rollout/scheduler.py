"""A bounded request queue and a batching loop for engines that decode in their own loop.

Requests waiting together whose `key` matches (same weights and adapter) run in one batch of up
to `max_batch_prompts` prompts; bigger requests are split across batches. Completions reach
each request's queue from the worker thread through `deliver` (on the event loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import structlog

from services.rollout.domain import Completion, LogprobsMode, QueueFull, SamplingSpec

log = structlog.get_logger("tlm.rollout.scheduler")

END = object()  # put on a job's queue after its last completion


@dataclass(eq=False)
class Job:
    """One accepted Generate request."""

    key: Hashable
    prompt_ids: list[list[int]]
    sampling: SamplingSpec
    seed: int
    payload: Any  # what the engine needs to run it (weights, adapter handle)
    return_prompt_ids: bool = False
    logprobs_mode: LogprobsMode = LogprobsMode.RAW
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    done: bool = False
    next_prompt: int = 0
    remaining: int = 0

    def __post_init__(self) -> None:
        self.remaining = len(self.prompt_ids) * self.sampling.n


@dataclass(frozen=True)
class Chunk:
    """Prompts [start, end) of a job, inside one batch."""

    job: Job
    start: int
    end: int


class Throughput:
    """Generated tokens per second over a sliding window.

    `add` runs on decode threads and `rate` on the event loop, so both hold a lock; both prune
    events older than the window (memory stays bounded when nobody polls), and a running sum
    makes `rate` O(1) amortised.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.total = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._in_window = 0  # sum of the tokens in _events

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._in_window -= self._events.popleft()[1]

    def add(self, tokens: int) -> None:
        with self._lock:
            now = self._clock()
            self.total += tokens
            self._events.append((now, tokens))
            self._in_window += tokens
            self._prune(now)

    def rate(self) -> float:
        with self._lock:
            now = self._clock()
            self._prune(now)
            if not self._events:
                return 0.0
            return self._in_window / max(now - self._events[0][0], 1.0)

    def __len__(self) -> int:
        """Events held (for tests: bounded by the window)."""
        return len(self._events)


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[list[Chunk]], Awaitable[None]],
        on_done: Callable[[Job], None],
        max_queue: int,
        max_batch_prompts: int,
    ) -> None:
        self._run_batch = run_batch
        self._on_done = on_done
        self.max_queue = max_queue
        self.max_batch_prompts = max_batch_prompts
        self._waiting: collections.deque[Job] = collections.deque()
        self._admitted: set[Job] = set()
        self._running: set[Job] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        if len(self._admitted) >= self.max_queue:
            raise QueueFull(
                f"the rollout queue is full ({self.max_queue} requests); retry with backoff",
                metadata={"max_queue": str(self.max_queue)},
            )
        self._admitted.add(job)
        self._waiting.append(job)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def cancel(self, job: Job) -> None:
        """Stop a job (its running rows end at the next decode step) and free its slot."""
        if not job.done:
            job.cancelled = True
            self._finish(job)

    def deliver(self, job: Job, completion: Completion) -> None:
        if job.done:
            return
        job.out.put_nowait(completion)
        job.remaining -= 1
        if job.remaining == 0:
            job.out.put_nowait(END)
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.done = True
        self._admitted.discard(job)
        self._running.discard(job)
        if job in self._waiting:
            self._waiting.remove(job)
        self._on_done(job)

    def _take_batch(self) -> list[Chunk]:
        key, room, chunks = self._waiting[0].key, self.max_batch_prompts, []
        for job in list(self._waiting):
            if room == 0:
                break
            if job.key != key:
                continue
            end = min(len(job.prompt_ids), job.next_prompt + room)
            chunks.append(Chunk(job, job.next_prompt, end))
            room -= end - job.next_prompt
            job.next_prompt = end
            if end == len(job.prompt_ids):
                self._waiting.remove(job)
            self._running.add(job)
        return chunks

    async def _loop(self) -> None:
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            chunks = self._take_batch()
            try:
                await self._run_batch(chunks)
            except Exception as exc:
                log.error("rollout_batch_failed", exc_info=exc)
                for job in {c.job for c in chunks}:
                    if not job.done:
                        job.out.put_nowait(exc)
                        self._finish(job)
            # While idle, a batch kept here would keep its jobs' weights (an old model) alive.
            del chunks

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
