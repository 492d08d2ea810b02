"""Bytes that are no valid request message are INVALID_ARGUMENT on every kind of RPC, and the
server keeps serving. The requests are built by hand, as a hostile or buggy client would."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from structlog.testing import capture_logs

from services.devtools.server_thread import ServerThread
from tests.rpc_details import rpc_details
from tlm.registry.v1 import registry_pb2, registry_pb2_grpc

TEAM_A = (("authorization", "Bearer key-team-a"),)
GARBAGE = b"\xff\xff\xff"  # a field tag whose varint never ends: "wire format was corrupt"
REGISTRY = "/tlm.registry.v1.RegistryService/"
REWARD = "/tlm.reward.v1.RewardService/"
ROLLOUT = "/tlm.rollout.v1.RolloutService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ...}} `depth` levels deep: each level is a
    Struct.fields (1) map entry with key (1) "a" and value (2) Value.struct_value (5)."""
    body = b""
    for _ in range(depth):
        body = _field(1, _field(1, b"a") + _field(2, _field(5, body)))
    return body


@pytest.fixture
def channel(secured: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(secured.address) as ch:
        yield ch


def _raw(channel: grpc.Channel, kind: str, method: str):  # type: ignore[no-untyped-def]
    """A callable that sends bytes as they are (no serializer) and returns raw responses."""
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


def _assert_malformed(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "not a valid protobuf message" in (err.details() or "")
    details = rpc_details(err)
    assert details.error_info is not None and details.bad_request is not None
    assert details.reason == "INVALID_FIELD" and details.metadata["cause"] == "MALFORMED_REQUEST"
    assert details.violations[0][1] == err.details()


def _still_serving(channel: grpc.Channel) -> None:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    page = stub.ListModels(registry_pb2.ListModelsRequest(), metadata=TEAM_A, timeout=10)
    assert isinstance(page, registry_pb2.ListModelsResponse)


def test_garbage_to_a_unary_method_is_invalid_argument(channel: grpc.Channel) -> None:
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as err:
        _raw(channel, "unary_unary", REGISTRY + "GetModel")(GARBAGE, metadata=TEAM_A, timeout=10)
    _assert_malformed(err.value)
    assert not [e for e in logs if e["event"] == "rpc_unexpected_error"]
    assert [e["code"] for e in logs if e["event"] == "rpc"] == ["INVALID_ARGUMENT"]
    _still_serving(channel)


def test_garbage_in_a_client_stream_is_invalid_argument(channel: grpc.Channel) -> None:
    upload = _raw(channel, "stream_unary", REGISTRY + "UploadModelRevision")
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as err:
        upload(iter([GARBAGE]), metadata=TEAM_A, timeout=10)
    _assert_malformed(err.value)
    assert not [e for e in logs if e["event"] == "rpc_unexpected_error"]
    _still_serving(channel)


def test_garbage_after_a_valid_message_in_a_bidi_stream(channel: grpc.Channel) -> None:
    """StreamScore reads its config, then meets garbage where a sample should be."""
    from tests.reward.helpers import spec
    from tlm.reward.v1 import reward_service_pb2 as rs

    length = spec({"scorers": [{"name": "short", "length": {"max_length": 10}}]})
    config = rs.StreamScoreRequest(config=rs.ScoreRequest(spec=length))
    stream = _raw(channel, "stream_stream", REWARD + "StreamScore")
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as err:
        list(stream(iter([config.SerializeToString(), GARBAGE]), metadata=TEAM_A, timeout=30))
    _assert_malformed(err.value)
    assert not [e for e in logs if e["event"] == "rpc_unexpected_error"]
    _still_serving(channel)


def test_garbage_to_a_server_streaming_method(channel: grpc.Channel) -> None:
    generate = _raw(channel, "unary_stream", ROLLOUT + "Generate")
    with pytest.raises(grpc.RpcError) as err:
        list(generate(GARBAGE, metadata=TEAM_A, timeout=10))
    _assert_malformed(err.value)


def test_a_struct_nested_past_the_recursion_limit_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    # AppendDatasetRowsRequest: parent (1), then one row (3) 200 levels deep.
    request = _field(1, b"datasets/deep") + _field(3, nested_struct(200))
    append = _raw(channel, "unary_unary", REGISTRY + "AppendDatasetRows")
    with pytest.raises(grpc.RpcError) as err:
        append(request, metadata=TEAM_A, timeout=10)
    _assert_malformed(err.value)
    _still_serving(channel)


def test_the_hand_built_struct_is_valid_when_shallow() -> None:
    """The encoding above is right: ten levels parse, and the leaf is an empty Struct."""
    row = registry_pb2.AppendDatasetRowsRequest.FromString(_field(3, nested_struct(10))).rows[0]
    for _ in range(10):
        row = row.fields["a"].struct_value
    assert not row.fields
