"""One server interceptor for every service: authentication, error mapping, a log line and
metrics per RPC. Handlers stay thin: they raise domain errors and never touch status codes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from services.common.auth import Authenticator, bind_team
from services.common.errors import MalformedRequest, TlmError, status_code_for, to_rpc_status
from services.common.metrics import RPC_LATENCY, RPC_TOTAL, split_method

log = structlog.get_logger("tlm.rpc")

Behavior = Callable[..., Any]


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        rpc = _Rpc(method, metadata, self._auth)
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                rpc.wrap_unary(handler.unary_unary, streamed=False),
                parse,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                rpc.wrap_unary(handler.stream_unary, streamed=True),
                parse,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                rpc.wrap_stream(handler.unary_stream, streamed=False),
                parse,
                handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            rpc.wrap_stream(handler.stream_stream, streamed=True),
            parse,
            handler.response_serializer,
        )


@dataclass(frozen=True)
class _Malformed:
    """What the request deserializer returns for bytes that are no valid message: grpc.aio
    turns a deserializer's exception into UNKNOWN (unary) or INTERNAL (streams), so the
    error is raised later, inside the call, where the error table maps it."""

    error: str


# What parsing untrusted bytes may raise: bad wire format, nesting past the recursion limit.
PARSE_ERRORS = (DecodeError, RecursionError, ValueError)


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except PARSE_ERRORS as exc:
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise MalformedRequest(
            f"the request is not a valid protobuf message for this method ({request.error})"
        )
    return request


async def _checked_stream(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class _Rpc:
    """The per-call wrapper: binds the team and log context, maps errors, records the outcome."""

    def __init__(self, method: str, metadata: tuple[Any, ...], auth: Authenticator) -> None:
        self.method = method
        self.metadata = metadata
        self.auth = auth
        self.service, self.short = split_method(method)
        self._pending_abort: grpc.Status | None = None
        self.peer = ""

    def _begin(self, context: grpc.aio.ServicerContext) -> None:
        # Read the peer now: after a cancelled call ends, context.peer() touches a freed call
        # object in grpc.aio (seen as a segfault).
        self.peer = context.peer()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=self.short)
        self.team: str | None = None
        team = self.team = self.auth.team_for(self.method, self.metadata)
        bind_team(team)
        structlog.contextvars.bind_contextvars(team=team)

    def _finish(
        self, context: grpc.aio.ServicerContext, start: float, code: grpc.StatusCode
    ) -> None:
        latency = time.perf_counter() - start
        RPC_TOTAL.labels(self.service, self.short, code.name).inc()
        RPC_LATENCY.labels(self.service, self.short).observe(latency)
        log.info(
            "rpc",
            method=self.method,
            code=code.name,
            latency_ms=round(latency * 1000, 3),
            peer=self.peer,
            team=getattr(self, "team", None),
        )

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
        code = status_code_for(exc)
        if not isinstance(exc, TlmError | NotImplementedError):
            log.error("rpc_unexpected_error", method=self.method, exc_info=exc)
        status = rpc_status.to_status(to_rpc_status(exc, self.method))
        self._pending_abort = status
        return code

    @asynccontextmanager
    async def _guarded(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The one error path of unary and streaming calls: bind the call, map what escapes
        the handler to a status (sent by `_abort_if_failed` after the block), log it. The block
        starts with `_begin`, so a refused API key takes this path too."""
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
            code = _code_set_on(context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if _is_abort(exc):
                code = _code_set_on(context)
                raise
            code = await self._fail(context, exc)
        finally:
            self._finish(context, start, code)

    async def _abort_if_failed(self, context: grpc.aio.ServicerContext) -> None:
        if self._pending_abort is not None:
            await _abort(context, self._pending_abort)

    def wrap_unary(self, behavior: Behavior, streamed: bool) -> Behavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            result = None
            async with self._guarded(context):
                self._begin(context)
                request = _checked_stream(request) if streamed else _checked(request)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
            await self._abort_if_failed(context)
            return result

        return wrapped

    def wrap_stream(self, behavior: Behavior, streamed: bool) -> Behavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._guarded(context):
                self._begin(context)
                request = _checked_stream(request) if streamed else _checked(request)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    async for item in result:
                        yield item
            await self._abort_if_failed(context)

        return wrapped


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError from context.abort(); it already carries its status.
    return type(exc).__name__ == "AbortError"


def _code_set_on(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK


async def _abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)
