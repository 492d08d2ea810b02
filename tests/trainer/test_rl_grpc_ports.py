"""The gRPC ports' conversions: remote errors classified by ErrorInfo reason, scores to domain."""

from __future__ import annotations

import grpc
import pytest
from grpc_status import rpc_status

from services.clients.errors import to_domain
from services.common.errors import FailedPrecondition, InvalidArgument, to_rpc_status
from services.rollout.domain import AdapterIncompatible, NoModelLoaded, invalid
from services.trainer.params import Sampling
from services.trainer.rl.batch import ScoreStatus
from services.trainer.rl.grpc_ports import GrpcSampler, _score, policy_lost
from services.trainer.rl.ports import PolicyRef
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.rollout.v1 import rollout_pb2


def rpc_error(exc: Exception) -> grpc.aio.AioRpcError:
    """The error a client sees when a service raised `exc` (as our interceptor sends it)."""
    status = rpc_status.to_status(to_rpc_status(exc))
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


def test_the_rollout_losing_the_policy_is_told_by_reason_not_by_code() -> None:
    lost = [
        invalid("adapter_revision", "models/x/revisions/2 is not loaded; call LoadAdapter first"),
        AdapterIncompatible("the loaded model changed"),
        NoModelLoaded("no model loaded"),
    ]
    for exc in lost:
        assert policy_lost(to_domain(rpc_error(exc))), exc
    error = to_domain(rpc_error(lost[0])).remote
    assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ("adapter_revision",)
    # Same status codes, other meanings: the user's bad sampling, a precondition without reason.
    not_lost = [invalid("sampling.top_p", "must be in (0, 1]"), InvalidArgument("bad")]
    for exc in not_lost:
        assert not policy_lost(to_domain(rpc_error(exc))), exc
    bare = grpc.aio.AioRpcError(
        grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), "x"
    )
    assert not policy_lost(to_domain(bare))
    busy = to_domain(rpc_error(FailedPrecondition("busy")))
    assert busy.remote is not None and busy.remote.reason == "WRONG_STATE"


def test_scores_keep_status_and_only_ok_scorer_values() -> None:
    ok = rs.SampleResult(
        status=rs.SCORE_STATUS_OK,
        reward=0.75,
        scorers=[
            rs.ScorerResult(scorer="a", status=rs.SCORE_STATUS_OK, value=0.5),
            rs.ScorerResult(scorer="b", status=rs.SCORE_STATUS_TIMEOUT, value=9.0),
        ],
    )
    score = _score(ok)
    assert (score.status, score.reward, score.scorers) == (ScoreStatus.OK, 0.75, {"a": 0.5})
    bad = _score(rs.SampleResult(status=rs.SCORE_STATUS_UNSCORABLE, reward=float("nan")))
    assert bad.status is ScoreStatus.UNSCORABLE and bad.reward == 0.0
    assert _score(rs.SampleResult(status=rs.SCORE_STATUS_PENDING)).status is ScoreStatus.PENDING
    # A reward outside OK is ignored; an OK result without one is a pre-`optional` server's zero.
    assert _score(rs.SampleResult(status=rs.SCORE_STATUS_ERROR, reward=3.0)).reward == 0.0
    old_zero = _score(rs.SampleResult(status=rs.SCORE_STATUS_OK))
    assert (old_zero.status, old_zero.reward) == (ScoreStatus.OK, 0.0)


class RecordingRollout:
    """A rollout client whose generate records the request and answers one completion per row."""

    def __init__(self) -> None:
        self.requests: list[rollout_pb2.GenerateRequest] = []

    async def generate(self, request, team=None, timeout_s=None):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        completions = [
            rollout_pb2.Completion(prompt_index=i, token_ids=[7], logprobs=[-0.5])
            for i in range(len(request.prompts))
        ]
        yield rollout_pb2.GenerateResponse(completions=completions)


async def test_the_sampler_asks_for_temperature_scaled_log_probs_when_told() -> None:
    rows, sampling = [{"prompt": "hi"}], Sampling(temperature=0.7)
    for scaled, mode in (
        (True, rollout_pb2.LOGPROBS_MODE_TEMPERATURE_SCALED),
        (False, rollout_pb2.LOGPROBS_MODE_RAW),
    ):
        rollout = RecordingRollout()
        sampler = GrpcSampler(rollout, scaled_logprobs=scaled)  # type: ignore[arg-type]
        (sample,) = await sampler.generate(rows, sampling, PolicyRef("m"), "r")
        assert sample.logprobs == [-0.5]
        (request,) = rollout.requests
        assert request.sampling.logprobs_mode == mode
        assert request.sampling.temperature == pytest.approx(0.7)
