"""Second security review of the reward service: one team's slow rule samples must not hold
every rule worker, and the outcome cache must not tell one team what another scored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from services.reward.cache import content_key
from services.reward.domain import Sample
from services.reward.rule_runner import RuleRunner
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tests.reward.test_rule_hardening import SLOW, UNIQUE, json_scorer, statuses
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_one_team_cannot_hold_every_rule_worker() -> None:
    """Team a's samples each run to a long per-sample timeout (a spec may ask for minutes);
    team b's quick sample still gets a worker at once instead of waiting out its deadline."""
    slow = json_scorer(UNIQUE, timeout_s=60)
    quick = ev.ScorerSpec(name="r")
    quick.regex.pattern = "^ok$"

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            far = time.monotonic() + 20
            hogs = [
                asyncio.ensure_future(
                    runner.run(slow, [Sample(f"s{i}", SLOW)], timeout_s=60, deadline=far, team="a")
                )
                for i in range(3)
            ]
            await asyncio.sleep(0.5)
            start = time.monotonic()
            got = await runner.run(
                quick, [Sample("q", "ok")], timeout_s=5, deadline=start + 5, team="b"
            )
            assert statuses(got) == ["OK"] and got[0][0].raw == 1.0
            assert time.monotonic() - start < 2
            for hog in hogs:
                hog.cancel()
            await asyncio.gather(*hogs, return_exceptions=True)
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # holds the rule pool's workers: seconds
def test_a_team_alone_still_uses_the_pool() -> None:
    """Chunks of one team queue for the workers it may use and all finish."""
    scorer = ev.ScorerSpec(name="r")
    scorer.regex.pattern = "^ok$"

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            samples = [Sample(f"s{i}", "ok" if i % 2 else "no") for i in range(300)]
            got = await runner.run(
                scorer, samples, timeout_s=5, deadline=time.monotonic() + 30, team="a"
            )
            assert [o.raw for o, _ in got] == [1.0 if i % 2 else 0.0 for i in range(300)]
        finally:
            runner.close()

    asyncio.run(body())


def test_cache_keys_differ_between_teams() -> None:
    scorer = ev.ScorerSpec(name="e")
    scorer.exact_match.SetInParent()
    one = Sample("s", "42", metadata={"reference": "42"})
    assert content_key(scorer, one, "team-a") != content_key(scorer, one, "team-b")
    assert content_key(scorer, one, "team-a") == content_key(scorer, one, "team-a")


def test_cached_outcomes_are_not_shared_between_teams(tmp_path: Path) -> None:
    """Team b must not learn (from `cached` or latency) that team a scored this exact
    completion and reference; team a's own repeat is still a hit."""
    keys = {"key-a": "team-a", "key-b": "team-b"}
    server = start_reward(tmp_path, api_keys=keys, insecure_dev=False)
    request = rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "e", "exact_match": {}}]}),
        samples=[sample("s", "secret-7731", reference="secret-7731")],
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)

            def cached(key: str) -> bool:
                result = stub.Score(request, timeout=30, metadata=(("x-api-key", key),)).results[0]
                assert result.status == rs.SCORE_STATUS_OK and result.reward == 1.0
                return result.scorers[0].cached

            assert cached("key-a") is False
            assert cached("key-b") is False
            assert cached("key-a") is True
    finally:
        server.stop()
