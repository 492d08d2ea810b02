"""From per-scorer outcomes to one reward per sample: normalisation, fallbacks, gates and the
aggregation. Pure functions; a scorer that failed never turns into a silent zero."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from services.reward.domain import SEVERITY, Outcome, SampleResult, ScorerResult, Status
from tlm.reward.v1 import evaluator_pb2 as ev


def normalized(raw: float, norm: ev.Normalization) -> float:
    """clip(scale * raw + offset, clip_min, clip_max).

    >>> n = ev.Normalization(scale=2.0, offset=-1.0, clip_max=0.5)
    >>> normalized(0.25, n), normalized(1.0, n)
    (-0.5, 0.5)
    """
    scale = norm.scale if norm.HasField("scale") else 1.0
    value = scale * raw + norm.offset
    if norm.HasField("clip_min"):
        value = max(value, norm.clip_min)
    if norm.HasField("clip_max"):
        value = min(value, norm.clip_max)
    return value


def scorer_result(
    spec: ev.ScorerSpec, outcome: Outcome, cached: bool = False, latency_s: float = 0.0
) -> ScorerResult:
    ok = outcome.status == Status.OK and math.isfinite(outcome.raw)
    if outcome.status == Status.OK and not ok:
        outcome = Outcome.error(f"scorer returned a non-finite value {outcome.raw}")
    return ScorerResult(
        scorer=spec.name,
        status=outcome.status,
        raw_value=outcome.raw if ok else 0.0,
        value=normalized(outcome.raw, spec.normalization) if ok else 0.0,
        reason=outcome.reason,
        cached=cached,
        latency_s=latency_s,
        review=outcome.review,
    )


def _weighted(values: Sequence[tuple[float, float]], kind: int) -> float:
    """Combine (weight, value) pairs.

    >>> pairs = [(1.0, 1.0), (0.5, 0.0), (2.0, 0.5)]
    >>> kinds = (ev.AGGREGATION_WEIGHTED_SUM, ev.AGGREGATION_WEIGHTED_MEAN, ev.AGGREGATION_MIN,
    ...          ev.AGGREGATION_MAX)
    >>> [_weighted(pairs, k) for k in kinds]
    [2.0, 0.5714285714285714, 0.0, 1.0]
    """
    return AGGREGATIONS[kind or ev.AGGREGATION_WEIGHTED_SUM](values)


def _mean(values: Sequence[tuple[float, float]]) -> float:
    return sum(w * v for w, v in values) / sum(w for w, _ in values)


AGGREGATIONS: Mapping[int, Callable[[Sequence[tuple[float, float]]], float]] = {
    ev.AGGREGATION_WEIGHTED_SUM: lambda vs: sum(w * v for w, v in vs),
    ev.AGGREGATION_WEIGHTED_MEAN: _mean,
    ev.AGGREGATION_MIN: lambda vs: min(w * v for w, v in vs),
    ev.AGGREGATION_MAX: lambda vs: max(w * v for w, v in vs),
}


def effective(
    results: Mapping[str, ScorerResult], spec: ev.EvaluatorSpec, name: str
) -> ScorerResult:
    """The result that counts for `name`: its own if OK, else its fallback chain's first OK one
    (or the last one tried)."""
    by_name = {s.name: s for s in spec.scorers}
    current, seen = results[name], {name}
    while current.status != Status.OK and by_name[current.scorer].fallback:
        nxt = by_name[current.scorer].fallback
        if nxt in seen:
            break
        seen.add(nxt)
        current = results[nxt]
    return current


UNDECIDED = {Status.ERROR, Status.TIMEOUT, Status.PENDING}


def _gate_fires(gate: ev.Gate, result: ScorerResult) -> bool:
    """Gates compare the raw value (1.0 is a full pass for rule scorers)."""
    if result.status == Status.UNSCORABLE:
        return gate.on_unscorable if gate.HasField("on_unscorable") else True
    threshold = gate.min_value if gate.HasField("min_value") else 1.0
    return result.status == Status.OK and result.raw_value < threshold


def combine(
    spec: ev.EvaluatorSpec, sample_id: str, results: Sequence[ScorerResult]
) -> SampleResult:
    """The sample's status and reward from its scorer results (in spec order)."""
    by_name = {r.scorer: r for r in results}
    for gate in spec.gates:
        watched = effective(by_name, spec, gate.scorer)
        if watched.status in UNDECIDED:
            # The gate might have fired: no reward rather than one it would have replaced.
            reason = f"gate {gate.scorer!r} is {watched.status.name}: {watched.reason}"
            return SampleResult(sample_id, watched.status, None, results, reason=reason)
        if _gate_fires(gate, watched):
            return SampleResult(sample_id, Status.OK, gate.reward, results, gate=gate.scorer)
    counted = [
        (s.weight if s.HasField("weight") else 1.0, effective(by_name, spec, s.name))
        for s in spec.scorers
        if not s.monitor_only
    ]
    failed = [r for _, r in counted if r.status != Status.OK]
    if failed:
        worst = max(failed, key=lambda r: SEVERITY[r.status])
        reason = f"scorer {worst.scorer!r} is {worst.status.name}: {worst.reason}".rstrip(": ")
        return SampleResult(sample_id, worst.status, None, results, reason=reason)
    reward = _weighted([(w, r.value) for w, r in counted], spec.aggregation)
    return SampleResult(sample_id, Status.OK, reward, results)
