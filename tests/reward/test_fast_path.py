"""The per-call fast paths of Score: cheap rules scored inline, specs validated once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.reward import rule_runner, rule_worker
from services.reward.admission import Admission
from services.reward.cache import OutcomeCache
from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import Engine, ScoreContext
from services.reward.rule_runner import INLINE_MAX_CHARS, RuleRunner, inline
from services.reward.service import VALID_SPECS, RewardCore
from services.specs.evaluator import EvaluatorInvalid, require_valid
from tests.reward.helpers import MATH_SPEC, spec
from tests.reward.test_tenant_isolation import with_runner
from tlm.reward.v1 import evaluator_pb2 as ev

FORMAT = ev.ScorerSpec(name="f", format=ev.FormatScorer(tags=["answer"]))
MATH = ev.ScorerSpec(name="m", math=ev.MathScorer())


def test_only_small_batches_of_linear_rules_run_inline() -> None:
    small = [Sample("a", "<answer>4</answer>", metadata={"reference": "4"})]
    assert inline(FORMAT, small)
    assert not inline(MATH, small)  # sympy: unbounded, stays off the caller's thread
    json_rule = ev.ScorerSpec(name="j", json=ev.JsonScorer())
    assert not inline(json_rule, small)  # JSON Schema checks can take long
    big = [Sample("b", "x" * (INLINE_MAX_CHARS + 1))]
    assert not inline(FORMAT, big)
    # A reference list a contains rule would scan counts too; nested values are not sized.
    long_reference = [Sample("c", "x", metadata={"reference": ["y" * INLINE_MAX_CHARS, "z"]})]
    assert not inline(FORMAT, long_reference)
    assert not inline(FORMAT, [Sample("d", "x", metadata={"nested": {"a": 1}})])


def test_an_inline_rule_starts_no_worker() -> None:
    async def body() -> None:
        runner = RuleRunner(1)
        try:
            samples = [Sample("a", "<answer>4</answer>"), Sample("b", "no tags")]
            results = await runner.run(FORMAT, samples, timeout_s=5, deadline=time.monotonic() + 5)
            assert [o.raw for o, _ in results] == [1.0, 0.0]
            assert runner.worker_pids() == []  # scored on this thread, no process spawned
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # spawns two rule workers: seconds
@pytest.mark.parametrize("chunks", [1, 2])
def test_a_calls_worker_chunks_go_out_before_its_inline_rules_are_scored(
    monkeypatch: pytest.MonkeyPatch, chunks: int
) -> None:
    """The spec lists the cheap rule first; the math chunks (one, or two once the scorer's
    measured cost splits the call) are still sent before the rule is scored on the server's
    thread, so the workers score while it does (the calls pass through, recorded)."""
    order: list[str] = []
    send, scored = rule_worker.Worker.score, rule_runner.score_timed

    def sending(worker: rule_worker.Worker, *args: Any, **kwargs: Any) -> Any:
        order.append("send")
        return send(worker, *args, **kwargs)

    def scoring(scorer: ev.ScorerSpec, sample: Sample) -> Any:
        order.append(scorer.name)
        return scored(scorer, sample)

    monkeypatch.setattr(rule_worker.Worker, "score", sending)
    monkeypatch.setattr(rule_runner, "score_timed", scoring)
    evaluator = require_valid(ev.EvaluatorSpec(scorers=[FORMAT, MATH]))  # defaults filled in
    samples = [
        Sample(f"s{i}", f"<answer>${i}$</answer>", metadata={"reference": "3"}) for i in range(16)
    ]

    async def body(runner: RuleRunner) -> None:
        if chunks == 2:  # measured: 16 samples of 1 ms are worth both workers
            runner._costs.observe(
                "t", evaluator.scorers[1].SerializeToString(), [(Outcome.ok(1), 0.001)], True
            )
        engine = Engine(runner, OutcomeCache(0), {})
        results = await engine.score(evaluator, samples, ScoreContext("t", time.monotonic() + 30))
        assert [r.status for r in results] == [Status.OK] * 16

    with_runner(2, body)
    assert order[: chunks + 1] == ["send"] * chunks + ["f"]


def test_a_spec_is_validated_once_and_each_call_gets_its_own_copy() -> None:
    core = RewardCore(Engine(RuleRunner(0), OutcomeCache(0), {}), Admission(4, 60.0), 64)

    async def body() -> None:
        first, _ = await core.resolve(None, spec(MATH_SPEC), "t")
        first.scorers[0].weight = 99.0  # a caller changing its copy changes nobody else's
        second, _ = await core.resolve(None, spec(MATH_SPEC), "t")
        assert second.scorers[0].weight == pytest.approx(0.2)
        assert len(core._normalized) == 1
        bad = spec({"scorers": [{"name": "x", "weight": 1.0}]})  # no scorer kind
        for _ in range(2):  # an invalid spec is refused every time, never remembered
            with pytest.raises(EvaluatorInvalid):
                await core.resolve(None, bad, "t")
        assert len(core._normalized) == 1
        for i in range(VALID_SPECS + 5):  # bounded: the least recently used go
            other = spec({"scorers": [{"name": f"s{i}", "length": {"max_length": 10}}]})
            await core.resolve(None, other, "t")
        assert len(core._normalized) == VALID_SPECS

    asyncio.run(body())
