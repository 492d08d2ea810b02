"""Runs rule scorers off the event loop: in a process pool (true parallelism, and math-verify's
signal-based timeouts work in a worker's main thread) or, with zero workers, in a thread."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import structlog

from services.reward.domain import Outcome, Sample
from services.reward.rules import score_rule
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward.rules")

CHUNK = 64


def run_chunk(scorer_bytes: bytes, samples: Sequence[Sample]) -> list[tuple[Outcome, float]]:
    """Worker entry point: one scorer over a chunk of samples, with per-sample latency."""
    scorer = ev.ScorerSpec.FromString(scorer_bytes)
    results = []
    for sample in samples:
        start = time.perf_counter()
        outcome = score_rule(scorer, sample)
        results.append((outcome, time.perf_counter() - start))
    return results


def _warm() -> bool:
    import math_verify  # noqa: F401  # import sympy once per worker, not on the first request

    return True


class RuleRunner:
    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._executor: Executor | None = self._pool()

    def _pool(self) -> Executor | None:
        if self._workers <= 0:
            return None
        # spawn, not fork: the server process runs gRPC threads.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self._workers, mp_context=context)

    async def warm_up(self) -> None:
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, _warm)

    async def run(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample]
    ) -> list[tuple[Outcome, float]]:
        """A worker that died (OOM killer, SIGKILL) breaks the pool: rebuild it and retry once;
        a chunk that kills its worker twice is ERROR."""
        for attempt in range(2):
            executor = self._executor
            try:
                return await self._run(executor, scorer, samples)
            except BrokenProcessPool:
                log.warning("rule_pool_broken", scorer=scorer.name, attempt=attempt)
                if self._executor is executor:  # concurrent callers rebuild it once
                    if executor is not None:
                        executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = self._pool()
        return [(Outcome.error("rule worker crashed"), 0.0)] * len(samples)

    async def _run(
        self, executor: Executor | None, scorer: ev.ScorerSpec, samples: Sequence[Sample]
    ) -> list[tuple[Outcome, float]]:
        payload = scorer.SerializeToString()
        chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(loop.run_in_executor(executor, run_chunk, payload, c) for c in chunks)
        )
        return [item for part in parts for item in part]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
