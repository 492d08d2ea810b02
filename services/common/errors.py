"""Domain errors and the one table that turns them into gRPC status codes with google.rpc details.

Services raise subclasses with meaning (`DatasetRowsInvalid`, `JobNotFound`); the server
interceptor calls `to_rpc_status` on anything that escapes a handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tlm.common.v1 import common_pb2

if TYPE_CHECKING:
    from services.clients.errors import RemoteStatus

ERROR_DOMAIN = "tlm.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is a path such as `rows[12].chosen` or `scorers[2].regex.pattern`."""

    field: str
    description: str


class TlmError(Exception):
    """Base of every error a user can cause or act on. Subclasses pick the status code."""

    reason: int = common_pb2.ERROR_REASON_UNSPECIFIED
    # Set when the error came from another service (services/clients/errors.py): what it sent.
    remote: RemoteStatus | None = None

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
        reason: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations)
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason


class InvalidArgument(TlmError):
    reason = common_pb2.INVALID_FIELD


class MalformedRequest(InvalidArgument):
    """The request bytes are no valid message of the method's type (the interceptor raises it)."""

    def __init__(self, message: str) -> None:
        violation = FieldViolation("", message)  # "": the request as a whole
        super().__init__(message, violations=[violation], metadata={"cause": "MALFORMED_REQUEST"})


class NotFound(TlmError):
    reason = common_pb2.RESOURCE_NOT_FOUND


class AlreadyExists(TlmError):
    reason = common_pb2.RESOURCE_EXISTS


class FailedPrecondition(TlmError):
    reason = common_pb2.WRONG_STATE


class Aborted(TlmError):
    """A concurrent change won (e.g. an etag mismatch); re-read and retry."""

    reason = common_pb2.ETAG_MISMATCH


class ResourceExhausted(TlmError):
    reason = common_pb2.OVERLOADED


class Unavailable(TlmError):
    reason = common_pb2.DEPENDENCY_UNAVAILABLE


class Unauthenticated(TlmError):
    reason = common_pb2.API_KEY_INVALID


class PermissionDenied(TlmError):
    """The caller is known but may not do this (sent by a service or a proxy in front of it)."""


class DependencyFailed(TlmError):
    """Another service failed unexpectedly (INTERNAL, UNKNOWN, DATA_LOSS): INTERNAL here too,
    with that service's message rather than a generic one."""


class NotImplementedYet(TlmError):
    reason = common_pb2.NOT_IMPLEMENTED


class DeadlineExceeded(TlmError):
    reason = common_pb2.ERROR_REASON_UNSPECIFIED


# Most specific first: the first class an error is an instance of decides its code.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Aborted, grpc.StatusCode.ABORTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotImplementedYet, grpc.StatusCode.UNIMPLEMENTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    # The generated base servicers raise NotImplementedError for RPCs a service lacks.
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# google.rpc details travel in trailing metadata, which gRPC caps (16 KiB by default).
MAX_MESSAGE = 1024
MAX_DESCRIPTION = 256
MAX_VIOLATIONS = 20


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_rpc_status(exc: BaseException, method: str = "") -> status_pb2.Status:
    """The google.rpc.Status for an exception. Unexpected errors get a generic message only."""
    code = status_code_for(exc)
    if isinstance(exc, TlmError):
        message, reason = exc.message, exc.reason
        metadata, violations = exc.metadata, exc.violations
    elif isinstance(exc, NotImplementedError):
        message = f"{method or 'this method'} is not implemented by this deployment yet"
        reason, metadata, violations = common_pb2.NOT_IMPLEMENTED, {"method": method}, []
    else:
        message, reason, metadata, violations = "internal error", 0, {}, []
    message = _clip(message, MAX_MESSAGE)
    metadata = {k: _clip(v, MAX_DESCRIPTION) for k, v in metadata.items()}
    if len(violations) > MAX_VIOLATIONS:
        omitted = len(violations) - MAX_VIOLATIONS
        violations = [*violations[:MAX_VIOLATIONS], FieldViolation("", f"{omitted} more omitted")]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if reason:
        info = error_details_pb2.ErrorInfo(
            reason=common_pb2.ErrorReason.Name(reason),  # type: ignore[arg-type]
            domain=ERROR_DOMAIN,
            metadata=metadata,
        )
        status.details.append(_pack(info))
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, MAX_DESCRIPTION),
                    description=_clip(v.description, MAX_DESCRIPTION),
                )
                for v in violations
            ]
        )
        status.details.append(_pack(bad))
    return status


def field_error(field: str, description: str, cls: type[TlmError] = InvalidArgument) -> TlmError:
    """Shortcut for the common single-field error."""
    return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])
