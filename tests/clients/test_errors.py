"""One classifier for every remote error: what a service sent (code, ErrorInfo reason, field
violations, RetryInfo) becomes the domain error that means the same, so a status code survives
a hop from service to service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.clients.registry import RegistryClient
from services.clients.reward import RewardClient
from services.common.client import RetryPolicy
from services.common.errors import (
    AlreadyExists,
    DependencyFailed,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    status_code_for,
)
from services.devtools.server_thread import ServerThread
from tests.clients.conftest import registry
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = registry(tmp_path_factory.mktemp("keyed"), api_keys={"k-a": "team-a"})
    yield server
    server.stop()


async def test_registry_refusals_keep_their_meaning(keyed: ServerThread) -> None:
    async with RegistryClient(keyed.address, api_key="k-a", retry=ONCE) as client:
        with pytest.raises(NotFound) as missing:
            await client.get("models", "models/nope")
        with pytest.raises(InvalidArgument) as bad:
            await client.get("models", "models/Bad_Name")
        await client.create_model("twice")
        with pytest.raises(AlreadyExists):
            await client.create_model("twice")
        assert await client.create_model("twice", exist_ok=True) is None
    remote = missing.value.remote
    assert remote is not None and remote.answered and remote.service == "registry"
    assert (remote.code, remote.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    assert missing.value.message == remote.message == "models/nope not found"
    assert bad.value.remote is not None and bad.value.remote.fields == ("name",)
    assert [v.field for v in bad.value.violations] == ["name"]  # passed on as they came
    async with RegistryClient(keyed.address, api_key="wrong", retry=ONCE) as stranger:
        with pytest.raises(Unauthenticated) as refused:
            await stranger.get("models", "models/twice")
    assert refused.value.remote is not None and refused.value.remote.reason == "API_KEY_INVALID"


def _status(code: int, message: str, *details: Any) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


class Refusing(rs_grpc.RewardServiceServicer):
    """Another team's reward service (same contract) that refuses, or fails, every Score."""

    def __init__(self, status: grpc.Status | None) -> None:
        self.status = status

    async def Score(self, request: Any, context: Any) -> Any:
        if self.status is None:
            raise RuntimeError("a bug over there")  # gRPC sends UNKNOWN
        await context.abort_with_status(self.status)


async def score_against(status: grpc.Status | None) -> BaseException:
    server = grpc.aio.server()
    rs_grpc.add_RewardServiceServicer_to_server(Refusing(status), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with RewardClient(f"127.0.0.1:{port}", retry=ONCE) as client:
            with pytest.raises(Exception) as err:
                await client.score(rs.ScoreRequest())
        return err.value
    finally:
        await server.stop(None)


async def test_permission_denied_stays_permission_denied_with_its_retry_hint() -> None:
    info = error_details_pb2.ErrorInfo(reason="QUOTA", domain="other.team", metadata={"q": "1"})
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)
    )
    err = await score_against(_status(code_pb2.PERMISSION_DENIED, "not your scorer", info, retry))
    assert isinstance(err, PermissionDenied) and err.message == "not your scorer"
    assert status_code_for(err) == grpc.StatusCode.PERMISSION_DENIED  # what we answer in turn
    assert err.remote is not None and err.remote.reason == "QUOTA"  # not one of ours: kept raw
    assert err.remote.metadata == {"q": "1"} and err.remote.retry_delay_s == 1.5
    assert err.remote.retryable  # the RetryInfo says so, whatever the code


async def test_a_remote_bug_is_a_dependency_failure_not_ours() -> None:
    err = await score_against(None)
    assert isinstance(err, DependencyFailed)
    assert err.remote is not None and err.remote.code == grpc.StatusCode.UNKNOWN
    assert not err.remote.answered and not err.remote.retryable


async def test_a_refusal_crosses_a_service_with_its_code(embedded: ServerThread) -> None:
    """The reward service asks the registry for the evaluator: its NOT_FOUND reaches us as
    NOT_FOUND, with the reason the registry gave and the name it was about."""
    async with RewardClient(embedded.address, retry=ONCE) as reward:
        request = rs.ScoreRequest(evaluator="evaluators/nope/revisions/latest")
        request.samples.add(sample_id="s", completion="x")
        with pytest.raises(NotFound) as err:
            await reward.score(request)
    assert err.value.remote is not None and err.value.remote.reason == "RESOURCE_NOT_FOUND"
    assert "evaluators/nope" in err.value.message
