"""The domain-error table and google.rpc details, worked by hand."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    status_code_for,
    to_rpc_status,
)
from tests.rpc_details import status_details


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
    details = status_details(status)
    assert details.error_info is not None and details.error_info.domain == "tlm.dev"
    assert (details.reason, details.metadata) == ("INVALID_FIELD", {"dataset": "datasets/d"})
    assert details.violations == [
        ("rows[3].chosen", "must be a non-empty string"),
        ("rows[7].label", "must be a boolean, got 'yes'"),
    ]


def test_unexpected_errors_do_not_leak_their_message() -> None:
    status = to_rpc_status(RuntimeError("password=hunter2"))
    assert status.code == code_pb2.INTERNAL and status.message == "internal error"
    assert not status.details
