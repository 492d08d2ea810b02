"""The one place a remote error becomes ours: `classify` reads what a service sent (status code,
message, and the google.rpc details in `grpc-status-details-bin`: ErrorInfo reason and
metadata, BadRequest field violations, RetryInfo) and `to_domain` turns it into the domain
error of services/common/errors.py with the same meaning, so the status code a caller finally
sees is the one the remote chose (PERMISSION_DENIED stays permission denied, NOT_FOUND stays
not found) and UNAVAILABLE is always an outage of the dependency.

Callers decide by `reason` and `fields` (what the service said), never by the code alone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    DependencyFailed,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
    PermissionDenied,
    ResourceExhausted,
    TlmError,
    Unauthenticated,
    Unavailable,
)
from tlm.common.v1 import common_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# The domain error for each status code; codes not here (INTERNAL, UNKNOWN, DATA_LOSS,
# CANCELLED) are a failure of the dependency: DependencyFailed.
DOMAIN: Mapping[grpc.StatusCode, type[TlmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: NotImplementedYet,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


@dataclass(frozen=True)
class RemoteStatus:
    """One failed call as the remote (or the gRPC library, when nothing answered) reported it."""

    code: grpc.StatusCode
    message: str  # the server's text, literally
    reason: str = ""  # ErrorInfo.reason, e.g. "RESOURCE_NOT_FOUND"; "" without an ErrorInfo
    metadata: Mapping[str, str] = field(default_factory=dict)  # ErrorInfo.metadata
    violations: tuple[FieldViolation, ...] = ()  # BadRequest.field_violations
    retry_delay_s: float | None = None  # RetryInfo.retry_delay
    answered: bool = False  # a TLM service sent it (our services always attach details)
    service: str = ""  # who was called: "registry", "reward", ...
    address: str = ""  # where

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(v.field for v in self.violations)

    @property
    def retryable(self) -> bool:
        """Worth the same call again later: an outage, a deadline, or a RetryInfo hint."""
        return self.code in RETRYABLE or self.retry_delay_s is not None

    @property
    def unreachable(self) -> str | None:
        """Why nothing answered ('connection refused', 'unknown host', 'unavailable'), or None
        when a server did."""
        if self.code != grpc.StatusCode.UNAVAILABLE or self.answered:
            return None
        lowered = self.message.lower()
        if "resolv" in lowered or "lookup" in lowered or "dns" in lowered:
            return "unknown host"
        if "connection refused" in lowered or "failed to connect" in lowered:
            return "connection refused"
        return "unavailable"


def classify(exc: grpc.RpcError, service: str = "", address: str = "") -> RemoteStatus:
    """What a failed call (sync or asyncio) carried.

    >>> class Err(grpc.RpcError):
    ...     def code(self): return grpc.StatusCode.UNAVAILABLE
    ...     def details(self): return "failed to connect to all addresses; Connection refused"
    ...     def trailing_metadata(self): return ()
    >>> status = classify(Err(), "registry", "localhost:1")
    >>> status.unreachable, status.retryable, status.reason
    ('connection refused', True, '')
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        status = None  # mismatched or unreadable details: the code and text still count
    reason, metadata, violations, delay = "", {}, [], None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return RemoteStatus(
        code,
        message,
        reason,
        metadata,
        tuple(violations),
        delay,
        answered=status is not None,
        service=service,
        address=address,
    )


def unreachable_message(service: str, address: str, why: str) -> str:
    """The text for a service that did not answer at all."""
    return f"cannot reach the {service or 'remote'} service at {address} ({why})"


def to_domain(exc: grpc.RpcError, service: str = "", address: str = "") -> TlmError:
    """The domain error for a failed call, with `.remote` set to what it carried."""
    status = classify(exc, service, address)
    why = status.unreachable
    if why is not None:
        err: TlmError = Unavailable(unreachable_message(service, address, why))
    else:
        cls = DOMAIN.get(status.code, DependencyFailed)
        known = status.reason in common_pb2.ErrorReason.DESCRIPTOR.values_by_name
        message = status.message or f"{service or 'remote'} answered {status.code.name}"
        err = cls(
            message,
            violations=status.violations,
            metadata=status.metadata,
            reason=common_pb2.ErrorReason.Value(status.reason) if known else None,
        )
    err.remote = status
    return err


def in_context(err: TlmError, prefix: str, violation_field: str | None = None) -> TlmError:
    """The same error (class, reason, remote) with `prefix: ` before its message; with
    `violation_field`, the violations name that field of the caller's request instead.

    >>> e = in_context(NotFound("evaluators/x not found"), "spec.evaluator", "spec.evaluator")
    >>> type(e).__name__, e.message
    ('NotFound', 'spec.evaluator: evaluators/x not found')
    >>> e.violations[0].field
    'spec.evaluator'
    """
    new = copy.copy(err)
    new.message = f"{prefix}: {err.message}"
    new.args = (new.message,)
    if violation_field is not None:
        new.violations = [FieldViolation(violation_field, err.message)]
    return new
