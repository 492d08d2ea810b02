"""How `tlm` fails: one red line on stderr and an exit code, never a traceback (`--debug`, or
TLM_DEBUG=1, re-raises so the traceback shows).

Commands raise; `HandledGroup.invoke`, the group class of `tlm` and of its sub-apps, is the one
place that turns an exception into that line, through `describe`:

| exception                                      | exit | line                                   |
|------------------------------------------------|------|----------------------------------------|
| `UserError` (bad flag, bad input row)          | 2    | its message                            |
| `OSError` naming a file (missing input)        | 2    | `PATH: No such file or directory`      |
| `CannotBind` (`tlm up --port <busy>`)          | 2    | `cannot listen on HOST:PORT ...`       |
| `RemoteError`, nothing answered at the address | 2    | `cannot reach the SERVICE service ...` |
| `RemoteError`, the service refused             | 1    | `CODE: message`, then its violations   |
| anything else (a bug)                          | 1    | `internal error: ...; rerun with ...`  |

Server text is printed literally (never read as Rich markup, so `[a-z0-9._-]` survives).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from services.common.client import resolve_address
from services.common.server import CannotBind

USAGE = 2  # the command could not run as asked: fix the command line, a file or the address
REFUSED = 1  # a service answered with an error
err_console = Console(stderr=True)


class UserError(Exception):
    """A mistake in the command line or its input files, described in one sentence."""


class RemoteError(Exception):
    """A gRPC error from `service`, called at `address` (which the error itself does not say)."""

    def __init__(self, service: str, address: str, error: grpc.RpcError, option: str) -> None:
        super().__init__(f"{service} at {address}: {error}")
        self.service, self.address, self.error, self.option = service, address, error, option


@contextmanager
def remote(service: str, address: str | None, option: str = "--address") -> Iterator[str]:
    """Resolve `service`'s address (flag, TLM_<SERVICE>_ADDRESS, TLM_ADDRESS, default) and tag
    any gRPC error raised inside the block with it. `option` is the flag that sets it."""
    target = resolve_address(service, address)
    try:
        yield target
    except grpc.RpcError as exc:
        raise RemoteError(service, target, exc, option) from exc


def unreachable(
    services: list[str], address: str, reason: str = "", option: str = "--address"
) -> str:
    """The line for services that did not answer at `address`.

    >>> line = unreachable(["registry"], "localhost:50051", "connection refused")
    >>> line.split("; ")[0]
    'cannot reach the registry service at localhost:50051 (connection refused)'
    >>> line.split("; ")[1]
    'start the services with `tlm up`, or pass --address HOST:PORT'
    >>> unreachable(["reward", "rollout", "trainer"], "h:1").split(";")[0]
    'cannot reach the reward, rollout and trainer services at h:1'
    """
    names = " and ".join([", ".join(services[:-1]), services[-1]] if services[1:] else services)
    why = f" ({reason})" if reason else ""
    return (
        f"cannot reach the {names} service{'s' if services[1:] else ''} at {address}{why}; "
        f"start the services with `tlm up`, or pass {option} HOST:PORT"
    )


def _connection_failure(error: grpc.RpcError) -> str | None:
    """Why nothing answered ('connection refused', 'unknown host'), or None if a server did.

    Our services attach google.rpc details to every error they send, UNAVAILABLE included; the
    client library's own connection failures carry none."""
    code, details = error.code(), (error.details() or "")  # type: ignore[attr-defined]
    # Sync errors carry (key, value) namedtuples, asyncio ones a grpc.aio.Metadata of pairs.
    metadata: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    details_sent = any(pair[0] == "grpc-status-details-bin" for pair in metadata)
    if code != grpc.StatusCode.UNAVAILABLE or details_sent:
        return None
    lowered = details.lower()
    if "resolv" in lowered or "lookup" in lowered:
        return "unknown host"
    if "connection refused" in lowered:
        return "connection refused"
    return "unavailable"


def _violations(error: grpc.RpcError) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    lines: list[str] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations)
    return lines


def describe(exc: BaseException) -> tuple[str, list[str], int]:
    """(the red line, detail lines, exit code) for an exception a command raised."""
    if isinstance(exc, UserError):
        return str(exc), [], USAGE
    if isinstance(exc, CannotBind):
        return f"{exc}; pick another with --port (0: any free port)", [], USAGE
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}", [], USAGE
    if isinstance(exc, RemoteError):
        reason = _connection_failure(exc.error)
        if reason is not None:
            return unreachable([exc.service], exc.address, reason, exc.option), [], USAGE
        return describe(exc.error)
    if isinstance(exc, grpc.RpcError):
        line = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        return line, _violations(exc), REFUSED
    return f"internal error: {type(exc).__name__}: {exc}; rerun with --debug", [], REFUSED


def print_error(line: str, details: list[str] | tuple[()] = ()) -> None:
    """`error: LINE` in red, then the details; literal text, never wrapped."""
    err_console.print(Text(f"error: {line}", style="red"), soft_wrap=True, highlight=False)
    for detail in details:
        err_console.print(Text(detail), soft_wrap=True, highlight=False)


def report(exc: BaseException) -> int:
    """Print `exc` as the red line (and its details); returns the exit code."""
    line, details, code = describe(exc)
    print_error(line, details)
    return code


def debugging(ctx: Any) -> bool:
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("TLM_DEBUG") == "1"


class HandledGroup(TyperGroup):
    """A command group whose commands' errors become one red line (see the module table)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise  # typer's own: --help, usage errors, explicit exits
        except Exception as exc:
            if debugging(ctx):
                raise
            raise typer.Exit(report(exc)) from exc
