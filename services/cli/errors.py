"""How `tlm` fails: one red line on stderr and an exit code, never a traceback (`--debug`, or
TLM_DEBUG=1, re-raises so the traceback shows).

Commands raise; `HandledGroup.invoke`, the group class of `tlm` and of its sub-apps, is the one
place that turns an exception into that line, through `describe`. Remote errors arrive as the
clients' domain errors (services/clients/errors.py), whose `remote` says what the service sent:

| exception                                      | exit | line                                   |
|------------------------------------------------|------|----------------------------------------|
| `UserError` (bad flag, bad input row)          | 2    | its message                            |
| `OSError` naming a file (missing input)        | 2    | `PATH: No such file or directory`      |
| `CannotBind` (`tlm up --port <busy>`)          | 2    | `cannot listen on HOST:PORT ...`       |
| `RemoteError`, nothing answered at the address | 2    | `cannot reach the SERVICE service ...` |
| `RemoteError`, the service refused             | 2    | `CODE: message`, then its violations   |
| anything else (a bug)                          | 1    | `internal error: ...; rerun with ...`  |

Every error the user can act on is exit 2; 1 is left for a bug in `tlm` (and for commands whose
answer is "no": `tlm health` when a service is down, `evaluators validate` on an invalid spec).
Server text is printed literally (never read as Rich markup, so `[a-z0-9._-]` survives).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from services.clients.base import ServiceClient
from services.clients.errors import RemoteStatus, classify
from services.common.client import resolve_address
from services.common.errors import TlmError
from services.common.server import CannotBind

USAGE = 2  # the command could not run as asked: the command line, a file, the address, a refusal
BUG = 1  # an error in tlm itself
err_console = Console(stderr=True)
T = TypeVar("T")
C = TypeVar("C", bound=ServiceClient)


class UserError(Exception):
    """A mistake in the command line or its input files, described in one sentence."""


class RemoteError(Exception):
    """An error from `service`, called at `address`; `option` is the flag that sets it."""

    def __init__(self, service: str, address: str, status: RemoteStatus, option: str) -> None:
        super().__init__(f"{service} at {address}: {status.code.name}: {status.message}")
        self.service, self.address, self.status, self.option = service, address, status, option


@contextmanager
def remote(service: str, address: str | None, option: str = "--address") -> Iterator[str]:
    """Resolve `service`'s address (flag, TLM_<SERVICE>_ADDRESS, TLM_ADDRESS, default) and tag
    any remote error raised inside the block with it. `option` is the flag that sets it."""
    target = resolve_address(service, address)
    try:
        yield target
    except TlmError as exc:
        if exc.remote is None or exc.remote.service not in ("", service):
            raise  # not from this service: an enclosing `remote` block tags it
        raise RemoteError(service, target, exc.remote, option) from exc
    except grpc.RpcError as exc:
        raise RemoteError(service, target, classify(exc, service, target), option) from exc


def call(
    client_class: type[C],
    address: str | None,
    fn: Callable[[C], Awaitable[T]],
    option: str = "--address",
) -> T:
    """Run `fn` with a client of `client_class`'s service; its errors are reported here."""
    with remote(client_class.service, address, option) as target:

        async def main() -> T:
            async with client_class(target) as client:
                return await fn(client)

        return run_sync(main())


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine to its end: on a new event loop, in a thread of its own when
    the caller already runs one (a notebook, an asyncio test invoking the CLI)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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


def _violations(status: RemoteStatus) -> list[str]:
    return [f"  {v.field}: {v.description}" for v in status.violations]


def describe(exc: BaseException) -> tuple[str, list[str], int]:
    """(the red line, detail lines, exit code) for an exception a command raised."""
    if isinstance(exc, UserError):
        return str(exc), [], USAGE
    if isinstance(exc, CannotBind):
        return f"{exc}; pick another with --port (0: any free port)", [], USAGE
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}", [], USAGE
    if isinstance(exc, RemoteError):
        status = exc.status
        if status.unreachable is not None:
            return (
                unreachable([exc.service], exc.address, status.unreachable, exc.option),
                [],
                USAGE,
            )
        return f"{status.code.name}: {status.message}", _violations(status), USAGE
    return f"internal error: {type(exc).__name__}: {exc}; rerun with --debug", [], BUG


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
