"""Aggregation, gates, fallbacks and statuses, worked out by hand."""

from __future__ import annotations

from services.reward.aggregate import combine, scorer_result
from services.reward.domain import Outcome, Status
from tlm.reward.v1 import evaluator_pb2 as ev


def spec(
    *scorers: ev.ScorerSpec, gates: tuple[ev.Gate, ...] = (), agg: int = 0
) -> ev.EvaluatorSpec:
    return ev.EvaluatorSpec(scorers=scorers, gates=gates, aggregation=agg)  # type: ignore[arg-type]


def s(name: str, weight: float = 1.0, **kw: object) -> ev.ScorerSpec:
    return ev.ScorerSpec(name=name, weight=weight, format=ev.FormatScorer(tags=["a"]), **kw)  # type: ignore[arg-type]


def results(sp: ev.EvaluatorSpec, *outcomes: Outcome) -> list:  # type: ignore[type-arg]
    return [scorer_result(x, o) for x, o in zip(sp.scorers, outcomes, strict=True)]


def test_weighted_sum_with_normalisation() -> None:
    # a: 0.5 * (2 * 1.0 - 1) = 0.5 ; b: 2.0 * clip(0.75, max 0.5) = 1.0 ; total 1.5
    a = s("a", 0.5, normalization=ev.Normalization(scale=2, offset=-1))
    b = s("b", 2.0, normalization=ev.Normalization(clip_max=0.5))
    sp = spec(a, b)
    out = combine(sp, "x", results(sp, Outcome.ok(1.0), Outcome.ok(0.75)))
    assert out.status == Status.OK and out.reward == 1.5


def test_weighted_mean_min_max() -> None:
    # pairs (w, v) = (1, 1.0), (3, 0.2): mean = (1 + 0.6) / 4 = 0.4; min 0.6; max 1.0
    for agg, expected in [
        (ev.AGGREGATION_WEIGHTED_MEAN, 0.4),
        (ev.AGGREGATION_MIN, 0.6),
        (ev.AGGREGATION_MAX, 1.0),
    ]:
        sp = spec(s("a", 1.0), s("b", 3.0), agg=agg)
        out = combine(sp, "x", results(sp, Outcome.ok(1.0), Outcome.ok(0.2)))
        assert out.reward is not None and abs(out.reward - expected) < 1e-12, agg


def test_a_failed_scorer_is_never_a_zero() -> None:
    sp = spec(s("a"), s("b"))
    out = combine(sp, "x", results(sp, Outcome.ok(1.0), Outcome.error("boom")))
    assert out.status == Status.ERROR and out.reward is None
    assert "'b' is ERROR: boom" in out.reason


def test_worst_status_wins() -> None:
    sp = spec(s("a"), s("b"), s("c"))
    outs = (Outcome.unscorable("no tag"), Outcome.timeout("slow"), Outcome(Status.PENDING))
    assert combine(sp, "x", results(sp, *outs)).status == Status.TIMEOUT


def test_monitor_only_is_reported_but_not_aggregated() -> None:
    sp = spec(s("a"), s("m", monitor_only=True))
    out = combine(sp, "x", results(sp, Outcome.ok(0.5), Outcome.error("ignored")))
    assert out.status == Status.OK and out.reward == 0.5
    assert [r.status for r in out.scorers] == [Status.OK, Status.ERROR]


def test_gate_fires_below_threshold_and_on_unscorable() -> None:
    gate = ev.Gate(scorer="fmt", reward=-1.0)
    sp = spec(s("fmt", 0.2), s("acc"), gates=(gate,))
    # format 0.5 < 1.0: the gate sets -1 even though acc failed.
    out = combine(sp, "x", results(sp, Outcome.ok(0.5), Outcome.error("x")))
    assert (out.status, out.reward, out.gate) == (Status.OK, -1.0, "fmt")
    out = combine(sp, "x", results(sp, Outcome.unscorable("no tags"), Outcome.ok(1)))
    assert out.reward == -1.0
    # Full pass: 0.2 * 1 + 1 * 1 = 1.2.
    out = combine(sp, "x", results(sp, Outcome.ok(1.0), Outcome.ok(1.0)))
    assert out.reward == 1.2 and out.gate == ""


def test_gate_can_ignore_unscorable() -> None:
    gate = ev.Gate(scorer="fmt", reward=-1.0, on_unscorable=False)
    sp = spec(s("fmt"), gates=(gate,))
    out = combine(sp, "x", results(sp, Outcome.unscorable("no tags")))
    assert out.status == Status.UNSCORABLE and out.reward is None


def test_fallback_replaces_a_failed_scorer() -> None:
    # judge fails -> rule (monitor_only) stands in with judge's weight 2: 2 * 0.25 = 0.5.
    sp = spec(s("judge", 2.0, fallback="rule"), s("rule", 1.0, monitor_only=True))
    out = combine(sp, "x", results(sp, Outcome.timeout("slow"), Outcome.ok(0.25)))
    assert out.status == Status.OK and out.reward == 0.5


def test_non_finite_value_is_an_error() -> None:
    sp = spec(s("a"))
    out = combine(sp, "x", results(sp, Outcome.ok(float("nan"))))
    assert out.status == Status.ERROR


def test_a_gate_that_cannot_be_decided_withholds_the_reward() -> None:
    """A gate whose scorer is ERROR/TIMEOUT/PENDING might have fired: no reward."""
    sp = spec(s("g", monitor_only=True), s("v"), gates=(ev.Gate(scorer="g", reward=-1.0),))
    for bad in (Outcome.error("boom"), Outcome.timeout("slow"), Outcome(Status.PENDING)):
        result = combine(sp, "x", results(sp, bad, Outcome.ok(1.0)))
        assert (result.status, result.reward) == (bad.status, None), result
        assert "gate" in result.reason


def test_a_deadline_keeps_the_per_sample_results_that_finished() -> None:
    """Three code-like samples taking 0.0 s, 0.1 s and 5 s; the deadline passes at 0.5 s: the
    first two keep their values, only the slow one is TIMEOUT."""
    import asyncio
    import time

    from services.reward.cache import OutcomeCache
    from services.reward.domain import Outcome, Sample
    from services.reward.engine import Engine, ScoreContext
    from services.reward.rule_runner import RuleRunner
    from tlm.reward.v1 import evaluator_pb2 as ev

    class Slow:
        per_sample = True

        async def score(self, scorer, samples, ctx):  # type: ignore[no-untyped-def]
            delay = float(samples[0].completion)
            await asyncio.sleep(delay)
            return [Outcome.ok(1.0)]

    spec = ev.EvaluatorSpec(scorers=[ev.ScorerSpec(name="c", weight=1.0, code=ev.CodeScorer())])
    engine = Engine(RuleRunner(0), OutcomeCache(0), {"code": Slow()})
    samples = [Sample(sample_id=str(i), completion=d) for i, d in enumerate(["0", "0.1", "5"])]

    async def go():  # type: ignore[no-untyped-def]
        return await engine.score(spec, samples, ScoreContext("t", time.monotonic() + 0.55))

    start = time.monotonic()
    results = asyncio.run(go())
    assert time.monotonic() - start < 2
    assert [r.status.name for r in results] == ["OK", "OK", "TIMEOUT"]
