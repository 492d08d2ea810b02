"""Rule scorers beyond their doctests: failure modes of the libraries they call."""

from __future__ import annotations

import pytest

from services.reward.domain import Sample, Status
from tlm.reward.v1 import evaluator_pb2 as ev


def test_math_timeout_is_timeout_not_a_cached_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import math_verify
    from math_verify.errors import TimeoutException

    from services.reward.rules import score_math

    def slow(*args: object, **kwargs: object) -> bool:
        if not kwargs.get("raise_on_error"):
            return False  # what math-verify does on a timeout without raise_on_error
        raise TimeoutException("too slow")

    monkeypatch.setattr(math_verify, "verify", slow)
    cfg = ev.MathScorer()
    outcome = score_math(cfg, Sample("a", "$x^2$", metadata={"reference": "x^2"}))
    assert outcome.status == Status.TIMEOUT and "timed out" in outcome.reason


def test_a_reference_is_parsed_once_for_its_group() -> None:
    """G samples of a prompt share its reference: math-verify parses it once per process, and
    the verdicts are those of parsing it every time."""
    from math_verify import parse, verify

    from services.reward.rules import math_value, parsed_reference

    reference = "\\frac{3}{7}"  # used by no other test
    answers = ["$\\frac{6}{14}$", "$0.5$", "$3/7$", "no number"]
    before = parsed_reference.cache_info()
    got = [math_value(a, reference) for a in answers]
    after = parsed_reference.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 3)
    fresh = [
        (1.0 if verify(parse(reference), p) else 0.0) if (p := parse(a)) else None for a in answers
    ]
    assert got == fresh == [1.0, 0.0, 1.0, None]


@pytest.mark.slow  # restarts a rule worker: seconds
def test_rule_pool_recovers_after_a_worker_is_killed() -> None:
    import asyncio
    import os
    import signal
    import time

    from services.reward.rule_runner import RuleRunner

    scorer = ev.ScorerSpec(name="c", contains=ev.ContainsScorer(substrings=["yes"]))

    async def body() -> list[float]:
        runner = RuleRunner(1)
        try:
            await runner.warm_up()
            for pid in runner.worker_pids():
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            limits = {"timeout_s": 10.0, "deadline": time.monotonic() + 60}
            first = await runner.run(scorer, [Sample("a", "yes")], **limits)
            second = await runner.run(scorer, [Sample("a", "no")], **limits)
            return [first[0][0].raw, second[0][0].raw]
        finally:
            runner.close()

    assert asyncio.run(body()) == [1.0, 0.0]
