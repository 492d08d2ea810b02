"""The google.rpc details a service sends with an error (the `grpc-status-details-bin` trailer the
interceptor writes): its ErrorInfo (reason, metadata) and BadRequest (field violations), decoded
from the wire the way any client would, for the tests of every service."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Details:
    """What one error carried; `None` where the status had no detail of that type."""

    error_info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None

    @property
    def reason(self) -> str:
        """ErrorInfo.reason, "" without an ErrorInfo."""
        return self.error_info.reason if self.error_info else ""

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.error_info.metadata) if self.error_info else {}

    @property
    def violations(self) -> list[tuple[str, str]]:
        """[(field, description)] of the BadRequest, in order; [] without one."""
        if self.bad_request is None:
            return []
        return [(v.field, v.description) for v in self.bad_request.field_violations]

    @property
    def fields(self) -> list[str]:
        return [field for field, _ in self.violations]


def status_details(status: status_pb2.Status) -> Details:
    """Unpack the first ErrorInfo and the first BadRequest of a google.rpc.Status."""
    info: error_details_pb2.ErrorInfo | None = None
    bad: error_details_pb2.BadRequest | None = None
    for detail in status.details:
        if info is None and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif bad is None and detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    return Details(info, bad)


def rpc_details(err: grpc.RpcError) -> Details:
    """The details of a failed call (sync or asyncio); fails the test if it carried none."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc details on {err}"
    return status_details(status)
