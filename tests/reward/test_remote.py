"""The remote scorer between two running reward services."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
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
    assert (a.status, a.reward, b.reward) == (rs.OK, 2.0, 0.0)


def test_unreachable_remote_is_an_error_then_the_breaker_opens(reward: Stub) -> None:
    address = dead_address()
    request = rs.ScoreRequest(
        spec=spec(remote_spec(address, max_retries=1, breaker_failures=1, breaker_reset="60s")),
        samples=[sample("a", "yes")],
    )
    first = reward.Score(request, timeout=30).results[0]
    assert first.status == rs.ERROR and "UNAVAILABLE" in first.scorers[0].reason
    second = reward.Score(request, timeout=30).results[0]
    assert second.status == rs.ERROR and "circuit open" in second.scorers[0].reason


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
    assert result.status == rs.UNSCORABLE and result.scorers[0].reason.startswith("remote:")
