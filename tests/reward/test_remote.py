"""The remote scorer between two running reward services."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from services.devtools.server_thread import ServerThread
from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import ScoreContext
from services.reward.remote import RemoteScorerAdapter
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

Stub = rs_grpc.RewardServiceStub
THEIRS = {"scorers": [{"name": "yes", "contains": {"substrings": ["yes"]}}]}


@pytest.fixture(scope="module")
def other_team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start_reward(tmp_path_factory.mktemp("other"))
    yield server
    server.stop()


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def remote_spec(address: str, **extra: object) -> dict[str, object]:
    remote = {"address": address, "spec": THEIRS, "timeout": "2s"} | extra
    return {"scorers": [{"name": "theirs", "weight": 2.0, "remote": remote}]}


def test_remote_scores_through_the_other_service(reward: Stub, other_team: ServerThread) -> None:
    request = rs.ScoreRequest(
        spec=spec(remote_spec(other_team.address)),
        samples=[sample("a", "yes please"), sample("b", "no")],
    )
    a, b = reward.Score(request, timeout=30).results
    assert (a.status, a.reward, b.reward) == (rs.SCORE_STATUS_OK, 2.0, 0.0)


def test_unreachable_remote_is_an_error_then_the_breaker_opens(reward: Stub) -> None:
    address = dead_address()
    request = rs.ScoreRequest(
        spec=spec(remote_spec(address, max_retries=1, breaker_failures=1, breaker_reset="60s")),
        samples=[sample("a", "yes")],
    )
    first = reward.Score(request, timeout=30).results[0]
    assert first.status == rs.SCORE_STATUS_ERROR and "UNAVAILABLE" in first.scorers[0].reason
    second = reward.Score(request, timeout=30).results[0]
    assert second.status == rs.SCORE_STATUS_ERROR and "circuit open" in second.scorers[0].reason


def test_check_references_refuses_an_address_that_does_not_answer(
    reward: Stub, other_team: ServerThread
) -> None:
    bad = json.dumps(remote_spec(dead_address()))
    request = rs.ValidateEvaluatorRequest(spec_json=bad, check_references=True)
    with pytest.raises(grpc.RpcError) as err:
        reward.ValidateEvaluator(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "scorers[0].remote.address" in (err.value.details() or "")
    good = json.dumps(remote_spec(other_team.address))
    request = rs.ValidateEvaluatorRequest(spec_json=good, check_references=True)
    assert reward.ValidateEvaluator(request, timeout=30).valid


def test_remote_error_status_is_passed_on(reward: Stub, other_team: ServerThread) -> None:
    theirs = {"scorers": [{"name": "m", "math": {}}]}  # no reference: UNSCORABLE there
    remote = {"address": other_team.address, "spec": theirs}
    request = rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "r", "remote": remote}]}), samples=[sample("a", "$2$")]
    )
    result = reward.Score(request, timeout=30).results[0]
    assert result.status == rs.SCORE_STATUS_UNSCORABLE and result.scorers[0].reason.startswith(
        "remote:"
    )


class Recorder(rs_grpc.RewardServiceServicer):
    """A fake remote: records each call's metadata; answers with `code` or one result per
    sample except those in `drop`."""

    def __init__(self, code: grpc.StatusCode | None = None, drop: int = 0) -> None:
        self.calls: list[dict[str, str]] = []
        self.code, self.drop = code, drop

    async def Score(self, request: rs.ScoreRequest, context: Any) -> rs.ScoreResponse:
        self.calls.append(dict(context.invocation_metadata()))
        if self.code is not None:
            await context.abort(self.code, "refused")
        kept = list(request.samples)[self.drop :]
        return rs.ScoreResponse(
            results=[
                rs.SampleResult(sample_id=s.sample_id, status=rs.SCORE_STATUS_OK, reward=0.5)
                for s in kept
            ]
        )


async def with_fake(fake: Recorder, body: Any) -> Any:
    server = grpc.aio.server()
    rs_grpc.add_RewardServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def scorer(address: str, **extra: Any) -> ev.ScorerSpec:
    remote = {"address": address, "evaluator": "evaluators/e/revisions/1"} | extra
    return json_format.ParseDict({"name": "r", "remote": remote}, ev.ScorerSpec())


def ctx(team: str = "team-a") -> ScoreContext:
    return ScoreContext(team=team, deadline=time.monotonic() + 10)


def test_no_service_key_or_arbitrary_env_var_reaches_a_spec_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SECRET_DB_PASSWORD", "hunter2")
    monkeypatch.setenv("TLM_API_KEY", "ambient-key")
    fake = Recorder()

    async def body(address: str) -> list[Outcome]:
        adapter = RemoteScorerAdapter({})
        plain = await adapter.score(scorer(address), [Sample("1", "x")], ctx())
        stolen = await adapter.score(
            scorer(address, api_key_env="SECRET_DB_PASSWORD"), [Sample("1", "x")], ctx()
        )
        return plain + stolen

    plain, stolen = asyncio.run(with_fake(fake, body))
    assert plain.status == Status.OK and stolen.status == Status.ERROR
    assert len(fake.calls) == 1
    assert not {"authorization", "x-tlm-team"} & set(fake.calls[0]), fake.calls


def test_an_operator_allowed_key_goes_to_its_address_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTNER_KEY", "k-partner")
    fake = Recorder()

    async def body(address: str) -> list[Outcome]:
        adapter = RemoteScorerAdapter({address: "PARTNER_KEY"})
        return await adapter.score(
            scorer(address, api_key_env="PARTNER_KEY"), [Sample("1", "x")], ctx()
        )

    (outcome,) = asyncio.run(with_fake(fake, body))
    assert outcome.status == Status.OK
    assert fake.calls[0]["authorization"] == "Bearer k-partner"


def test_api_key_env_the_operator_did_not_allow_is_invalid(reward: Stub) -> None:
    bad = json.dumps(remote_spec("127.0.0.1:1", api_key_env="HOME"))
    result = reward.ValidateEvaluator(rs.ValidateEvaluatorRequest(spec_json=bad), timeout=30)
    assert not result.valid
    assert [e.path for e in result.errors] == ["scorers[0].remote.api_key_env"]
    request = rs.ScoreRequest(spec=spec(json.loads(bad)), samples=[sample("a", "yes")])
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_breaker_is_per_team_and_ignores_caller_errors() -> None:
    async def body(address: str) -> list[Outcome]:
        adapter = RemoteScorerAdapter({})
        hasty = scorer(address, breaker_failures=1, breaker_reset="3600s")
        first = await adapter.score(hasty, [Sample("1", "x")], ctx("team-b"))
        again = await adapter.score(hasty, [Sample("1", "x")], ctx("team-b"))
        return first + again

    first, again = asyncio.run(with_fake(Recorder(grpc.StatusCode.NOT_FOUND), body))
    assert "NOT_FOUND" in first.reason and "circuit open" not in again.reason

    async def down(address: str) -> list[Outcome]:
        adapter = RemoteScorerAdapter({})
        hasty = scorer(address, breaker_failures=1, breaker_reset="3600s", max_retries=0)
        b = await adapter.score(hasty, [Sample("1", "x")], ctx("team-b"))
        b2 = await adapter.score(hasty, [Sample("1", "x")], ctx("team-b"))
        a = await adapter.score(scorer(address, max_retries=0), [Sample("1", "x")], ctx())
        return b + b2 + a

    fake = Recorder(grpc.StatusCode.UNAVAILABLE)
    _, b2, a = asyncio.run(with_fake(fake, down))
    assert "circuit open" in b2.reason and "circuit open" not in a.reason
    assert len(fake.calls) == 2  # team-b's open breaker did not stop team-a's call


def test_a_missing_remote_result_is_an_error() -> None:
    async def body(address: str) -> list[Outcome]:
        samples = [Sample("x", "a"), Sample("y", "b")]
        return await RemoteScorerAdapter({}).score(scorer(address), samples, ctx())

    dropped, kept = asyncio.run(with_fake(Recorder(drop=1), body))
    assert dropped.status == Status.ERROR and "no result" in dropped.reason
    assert (kept.status, kept.raw) == (Status.OK, 0.5)
