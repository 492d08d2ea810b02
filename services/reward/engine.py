"""The evaluator runtime: runs every scorer of a spec over a batch of samples and combines the
results. Rule scorers go through the cache and the rule runner; other families are adapters
behind `AsyncScorer`, looked up in a table by the ScorerSpec oneof name."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from services.reward.aggregate import combine, scorer_result
from services.reward.cache import OutcomeCache, content_keys, sample_digest
from services.reward.domain import Outcome, Sample, SampleResult, ScorerResult
from services.reward.metrics import SAMPLES, SCORER_LATENCY, SCORER_RESULTS
from services.reward.rule_runner import RuleRunner, inline
from services.reward.rules import RULES
from services.specs.evaluator_defaults import DEFAULT_TIMEOUT_S, duration_s
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward")

# Time kept back from the caller's deadline for what a deadline cuts short (sandboxes killed
# and reaped, rule workers replaced) and to build and send the response: a tenth of the call's
# time, within these bounds. A fixed 50 ms was too little on a loaded host: a 2 s call got its
# TIMEOUT result after the caller's deadline, as DEADLINE_EXCEEDED.
MIN_MARGIN_S, MAX_MARGIN_S = 0.05, 0.5
# Used when the caller sets no deadline.
MAX_REQUEST_S = 600.0


def scoring_time(remaining: float) -> float:
    """Seconds the scorers get of a call with `remaining` seconds to its deadline.

    >>> scoring_time(2.0), scoring_time(0.2), scoring_time(600.0)
    (1.8, 0.15000000000000002, 599.5)
    """
    return remaining - min(max(0.1 * remaining, MIN_MARGIN_S), MAX_MARGIN_S)


@dataclass(frozen=True)
class ScoreContext:
    """Per-request facts an adapter needs: who asks, and until when."""

    team: str
    deadline: float  # time.monotonic() by which scoring ends: the call's, less the margin

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class AsyncScorer(Protocol):
    """A non-rule scorer family (code, model, human, judge, remote)."""

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]: ...


def scorer_timeout(scorer: ev.ScorerSpec) -> float:
    return duration_s(scorer.timeout) if scorer.HasField("timeout") else DEFAULT_TIMEOUT_S


class Engine:
    def __init__(
        self, rules: RuleRunner, cache: OutcomeCache, adapters: Mapping[str, AsyncScorer]
    ) -> None:
        self.rules = rules
        self.cache = cache
        self.adapters = dict(adapters)

    async def score(
        self, spec: ev.EvaluatorSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[SampleResult]:
        """Every sample's result, in order. `spec` must be validated and normalised."""
        cached = self.cache.enabled and any(s.WhichOneof("scorer") in RULES for s in spec.scorers)
        digests = [sample_digest(s) for s in samples] if cached else []
        # Scorers that wait (on a rule worker, a model, a remote service) start first, and the
        # cheap rules scored on this thread (rule_runner.inline) yield once before scoring: a
        # rule worker's chunks (sent at once, or from tasks of their own when a call is split)
        # go out before that scoring holds the loop, and are scored meanwhile.
        scorers = list(spec.scorers)
        order = sorted(range(len(scorers)), key=lambda i: inline(scorers[i], samples))
        columns = await asyncio.gather(
            *(self._run(scorers[i], samples, digests, ctx) for i in order)
        )
        per_scorer: list[list[ScorerResult]] = [[] for _ in scorers]
        for i, column in zip(order, columns, strict=True):
            per_scorer[i] = column
        results = [
            combine(spec, sample.sample_id, [column[i] for column in per_scorer])
            for i, sample in enumerate(samples)
        ]
        # One increment per label set, not per sample: labels() costs more than the count.
        for status, n in Counter(r.status.name for r in results).items():
            SAMPLES.labels(status).inc(n)
        return results

    async def _run(
        self,
        scorer: ev.ScorerSpec,
        samples: Sequence[Sample],
        digests: Sequence[bytes],
        ctx: ScoreContext,
    ) -> list[ScorerResult]:
        kind = scorer.WhichOneof("scorer") or ""
        start = time.perf_counter()
        if kind in RULES:
            results = await self._run_rule(scorer, samples, digests, ctx)
        else:
            results = await self._run_adapter(kind, scorer, samples, ctx)
        SCORER_LATENCY.labels(kind).observe(time.perf_counter() - start)
        for (status, cached), n in Counter((r.status.name, r.cached) for r in results).items():
            SCORER_RESULTS.labels(kind, status, str(cached).lower()).inc(n)
        return results

    async def _run_rule(
        self,
        scorer: ev.ScorerSpec,
        samples: Sequence[Sample],
        digests: Sequence[bytes],
        ctx: ScoreContext,
    ) -> list[ScorerResult]:
        """Cached outcomes where the cache has them (`digests`: the samples' `sample_digest`s,
        empty with the cache disabled), the rule runner for the rest."""
        keys = content_keys(scorer, digests, ctx.team)
        hits = [self.cache.get(k) for k in keys] if keys else [None] * len(samples)
        misses = [i for i, hit in enumerate(hits) if hit is None]
        fresh: dict[int, tuple[Outcome, float]] = {}
        if misses:
            # The runner keeps both limits itself (a sample over its timeout, or unfinished at
            # the deadline, is TIMEOUT and its worker is replaced): samples that finished keep
            # their results.
            done = await self.rules.run(
                scorer,
                [samples[i] for i in misses],
                timeout_s=scorer_timeout(scorer),
                deadline=ctx.deadline,
                team=ctx.team,
            )
            for i, item in zip(misses, done, strict=True):
                fresh[i] = item
                if keys:
                    self.cache.put(keys[i], item[0])
        results = []
        for i, hit in enumerate(hits):
            if hit is not None:
                results.append(scorer_result(scorer, hit, cached=True))
            else:
                outcome, latency = fresh[i]
                results.append(scorer_result(scorer, outcome, latency_s=latency))
        return results

    async def _run_adapter(
        self, kind: str, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[ScorerResult]:
        adapter = self.adapters.get(kind)
        if adapter is None:
            why = f"{kind} scorers are not available in this deployment"
            return [scorer_result(scorer, Outcome.error(why)) for _ in samples]
        start = time.perf_counter()
        limit = max(ctx.remaining(), 0.001)
        if getattr(adapter, "per_sample", False):
            outcomes = await _each_by_deadline(adapter, kind, scorer, samples, ctx, limit)
        else:
            outcomes = await _all_by_deadline(adapter, kind, scorer, samples, ctx, limit)
        per_sample = (time.perf_counter() - start) / max(len(samples), 1)
        return [scorer_result(scorer, o, latency_s=per_sample) for o in outcomes]


async def _all_by_deadline(
    adapter: AsyncScorer,
    kind: str,
    scorer: ev.ScorerSpec,
    samples: Sequence[Sample],
    ctx: ScoreContext,
    limit: float,
) -> list[Outcome]:
    """Batched families (model, judge, remote, human): one call for the whole batch."""
    try:
        return await asyncio.wait_for(adapter.score(scorer, samples, ctx), limit)
    except TimeoutError:
        return [Outcome.timeout("the request deadline passed")] * len(samples)
    except Exception as exc:
        log.exception("scorer_failed", scorer=scorer.name, kind=kind)
        return [Outcome.error(f"{kind} scorer failed: {exc}")] * len(samples)


async def _each_by_deadline(
    adapter: AsyncScorer,
    kind: str,
    scorer: ev.ScorerSpec,
    samples: Sequence[Sample],
    ctx: ScoreContext,
    limit: float,
) -> list[Outcome]:
    """Per-sample families (code): at the deadline only the unfinished samples time out."""
    tasks = [asyncio.ensure_future(adapter.score(scorer, [s], ctx)) for s in samples]
    _done, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)  # let them clean up (kill sandboxes)
    outcomes = []
    for task in tasks:
        if task in pending or task.cancelled():
            outcomes.append(Outcome.timeout("the request deadline passed"))
        elif (exc := task.exception()) is not None:
            log.error("scorer_failed", scorer=scorer.name, kind=kind, exc_info=exc)
            outcomes.append(Outcome.error(f"{kind} scorer failed: {exc}"))
        else:
            outcomes.append(task.result()[0])
    return outcomes
