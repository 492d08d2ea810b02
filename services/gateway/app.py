"""The OpenAI-compatible HTTP endpoint (Starlette): `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (streamed as server-sent events with `stream: true`), `/health`.

The `model` field names a deployment. `Authorization: Bearer <key>` maps to a team with the
same Authenticator (and key table) as the gRPC services; the gateway then calls the deploy
service and the serving pool for that team. Errors have OpenAI's shape (errors.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.auth import Authenticator
from services.common.errors import TlmError, Unauthenticated
from services.gateway import responses
from services.gateway.backend import Backend, generate_request
from services.gateway.calls import Call, Kind, parse
from services.gateway.errors import ApiError, from_domain
from services.specs.names import DEPLOYMENT_PREFIX

log = structlog.get_logger("tlm.gateway")
ID_PREFIX: dict[Kind, str] = {"completion": "cmpl-", "chat": "chatcmpl-"}
PROMPT_PARAM: dict[Kind, str] = {"completion": "prompt", "chat": "messages"}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def api_error(exc: TlmError, kind: Kind) -> ApiError:
    """A generation error, before or after the first byte: the rollout's `prompts[i]` is the
    request's `prompt` or `messages`."""
    return from_domain(exc, PROMPT_PARAM[kind])


def create_app(
    backend: Backend, authenticator: Authenticator, max_body_bytes: int = 64 << 20
) -> Starlette:
    """The app; a request body over `max_body_bytes` is refused (413) before it is parsed."""

    def team(request: Request) -> str:
        metadata = [(k.lower(), v) for k, v in request.headers.items()]
        try:
            found = authenticator.team_for(f"/gateway{request.url.path}", metadata)
        except Unauthenticated as exc:
            raise ApiError(
                401, exc.message, type="authentication_error", code="invalid_api_key"
            ) from exc
        assert found is not None  # no gateway path is open
        return found

    async def models(request: Request) -> Response:
        deployments = await backend.deployments(team(request))
        return JSONResponse({"object": "list", "data": [_model(d) for d in deployments]})

    async def model(request: Request) -> Response:
        d = await backend.deployment(request.path_params["model"], team(request))
        return JSONResponse(_model(d))

    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    async def _generate(request: Request, kind: Kind) -> Response:
        caller = team(request)
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise ApiError(413, f"the request body is over {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        call = parse(body, kind)
        d = await backend.deployment(call.model, caller)
        response_id = ID_PREFIX[kind] + uuid.uuid4().hex
        served = "+".join(filter(None, [d.model_revision, d.adapter_revision]))
        head = responses.header(call, response_id, int(time.time()), call.model, served)
        stream = backend.generate(generate_request(call, d, response_id), caller)
        log.info("generate", deployment=d.name, kind=kind, stream=call.stream, id=response_id)
        try:
            if not call.stream:
                completions = [c async for r in stream for c in r.completions]
                return JSONResponse(responses.whole(call, head, completions))
            first = await anext(aiter(stream))  # refusals answer as errors, before any byte
        except TlmError as exc:
            raise api_error(exc, kind) from exc
        events = _events(call, head, first, stream)
        return StreamingResponse(events, media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TlmError)
        return error_response(from_domain(exc))

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", model),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: on_api_error, TlmError: on_domain_error},
    )


def _model(d: Any) -> dict[str, Any]:
    return {
        "id": d.name.removeprefix(DEPLOYMENT_PREFIX),
        "object": "model",
        "created": d.create_time.seconds,
        "owned_by": "tlm",
        "root": d.model_revision,
    }


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(
    call: Call, head: dict[str, Any], first: Any, stream: AsyncIterator[Any]
) -> AsyncIterator[str]:
    """Server-sent events: each completion's chunks as it finishes, usage if asked, [DONE]."""
    done = list(first.completions)
    for c in first.completions:
        for chunk in responses.chunks(call, head, c):
            yield _sse(chunk)
    try:
        async for response in stream:
            done += response.completions
            for c in response.completions:
                for chunk in responses.chunks(call, head, c):
                    yield _sse(chunk)
    except TlmError as exc:  # after the first byte, an error can only be an event
        yield _sse(api_error(exc, call.kind).body())
        return
    if call.include_usage:
        yield _sse(head | {"choices": [], "usage": responses.usage(done)})
    yield _sse("[DONE]")
