"""The gateway's server-sent events (services/gateway/app.py) when the rollout stream fails after
the first event: the error is the last event, in OpenAI's shape, naming the parameter as the same
error would before the first byte. No real stack reaches this with a `prompts[i]` field (the
rollout service checks prompts before its first response), so the stream is given here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.common.errors import FieldViolation, InvalidArgument
from services.gateway import responses
from services.gateway.app import _events, api_error
from services.gateway.calls import Kind, parse
from tlm.rollout.v1 import rollout_pb2

BODIES: dict[Kind, dict[str, Any]] = {
    "completion": {"model": "chat", "prompt": ["a", "b"]},
    "chat": {"model": "chat", "messages": [{"role": "user", "content": "a"}], "n": 2},
}
REFUSED = InvalidArgument(
    "prompts[0]: is refused by the engine",
    violations=[FieldViolation("prompts[0]", "is refused by the engine")],
)


async def _refused() -> AsyncIterator[Any]:
    """The rest of a rollout stream: refused before its next response."""
    raise REFUSED
    yield  # an async generator


def _stream_events(kind: Kind) -> list[dict[str, Any]]:
    call = parse(BODIES[kind] | {"stream": True}, kind)
    head = responses.header(call, "id-1", 0, "chat", "models/m/revisions/r1")
    first = rollout_pb2.GenerateResponse(
        completions=[rollout_pb2.Completion(text="x", finish_reason=rollout_pb2.FINISH_REASON_STOP)]
    )

    async def collect() -> list[str]:
        return [e async for e in _events(call, head, first, _refused())]

    events = asyncio.run(collect())
    return [json.loads(e.removeprefix("data: ")) for e in events]


@pytest.mark.parametrize(("kind", "param"), [("completion", "prompt"), ("chat", "messages")])
def test_an_error_after_the_first_event_names_the_prompt_parameter(kind: Kind, param: str) -> None:
    *chunks, error = _stream_events(kind)
    assert chunks and all("choices" in c for c in chunks)
    assert error["error"]["param"] == param
    assert error["error"]["message"] == f"{param}: is refused by the engine"
    assert error == api_error(REFUSED, kind).body()  # as it is before the first byte
