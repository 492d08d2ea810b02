"""The domain-error table and google.rpc details, worked by hand."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    status_code_for,
    to_rpc_status,
)


class DatasetRowsInvalid(InvalidArgument):
    pass


def test_subclasses_map_through_their_base() -> None:
    assert status_code_for(DatasetRowsInvalid("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_for(NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code_for(FailedPrecondition("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_code_for(NotImplementedError()) == grpc.StatusCode.UNIMPLEMENTED
    assert status_code_for(KeyError("boom")) == grpc.StatusCode.INTERNAL


def test_status_carries_error_info_and_field_violations() -> None:
    exc = DatasetRowsInvalid(
        "2 rows invalid",
        violations=[
            FieldViolation("rows[3].chosen", "must be a non-empty string"),
            FieldViolation("rows[7].label", "must be a boolean, got 'yes'"),
        ],
        metadata={"dataset": "datasets/d"},
    )
    status = to_rpc_status(exc)
    assert status.code == code_pb2.INVALID_ARGUMENT and status.message == "2 rows invalid"
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "INVALID_FIELD",
        "tlm.dev",
        {"dataset": "datasets/d"},
    )
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("rows[3].chosen", "must be a non-empty string"),
        ("rows[7].label", "must be a boolean, got 'yes'"),
    ]


def test_unexpected_errors_do_not_leak_their_message() -> None:
    status = to_rpc_status(RuntimeError("password=hunter2"))
    assert status.code == code_pb2.INTERNAL and status.message == "internal error"
    assert not status.details
