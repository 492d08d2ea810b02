"""OpenAI request bodies -> the Call to generate (pure; no HTTP, no gRPC).

Every parameter OpenAI defines for /v1/completions and /v1/chat/completions is either served or
refused with a 400 naming it; a parameter OpenAI's docs give a default for is accepted at that
default (the client libraries send some of them). Unknown parameters are refused, as OpenAI does.
Bounds the rollout service checks itself (n against its max_n, max_tokens against the context)
come back from it naming the field, which errors.py turns into the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from services.gateway.errors import ApiError, bad_param
from services.specs.sampling import MAX_STOP, MAX_TEMPERATURE

Kind = Literal["completion", "chat"]
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMMON = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs"}
    | {"stream", "stream_options", "user", "presence_penalty", "frequency_penalty", "logit_bias"}
)
KNOWN: dict[Kind, frozenset[str]] = {
    "completion": COMMON | {"prompt", "echo", "best_of", "suffix"},
    "chat": COMMON
    | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools"}
    | {"tool_choice", "parallel_tool_calls"},
}
# Parameters served only at their default: what each default is.
ONLY_DEFAULT: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
}


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters the request set (None: the deployment's default, then the engine's)."""

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Call:
    """One request: prompts are texts (completions) or one conversation of (role, content)."""

    kind: Kind
    model: str
    texts: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    sampling: Sampling = Sampling()
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False

    @property
    def prompt_count(self) -> int:
        return len(self.texts) if self.kind == "completion" else 1


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_param(name, "must be a number")
    return float(value)


def _integer(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_param(name, "must be an integer")
    if value < minimum:
        raise bad_param(name, f"must be >= {minimum}")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_param("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} sequences")
    return tuple(stops)


def _sampling(body: dict[str, Any], kind: Kind) -> Sampling:
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad_param("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_param("top_p", "must be in (0, 1]")
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_param("seed", "must be an integer")
    return Sampling(
        n=_integer(body, "n", 1) or 1,
        temperature=temperature,
        top_p=top_p,
        top_k=_integer(body, "top_k", 0),
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=seed,
    )


def _logprobs(body: dict[str, Any], kind: Kind) -> bool:
    value = body.get("logprobs")
    if kind == "chat":
        if value is not None and not isinstance(value, bool):
            raise bad_param("logprobs", "must be true or false")
        return bool(value)
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, int) or value != 0:
        raise bad_param(
            "logprobs",
            "only 0 is served: the sampled tokens' log-probabilities, without alternatives",
        )
    return True


def _texts(body: dict[str, Any]) -> tuple[str, ...]:
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_param("prompt", "must be a string or a non-empty list of strings")
    return tuple(texts)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise bad_param("messages", f"{where}.content must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise bad_param("messages", f"[{i}].role must be one of {', '.join(ROLES)}")
        out.append((ROLES[role], _content(m.get("content"), f"[{i}]")))
    return tuple(out)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_param("stream", "must be true or false")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_param("stream_options", "is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_param("stream_options", "only include_usage is served")
    return stream, bool(options.get("include_usage"))


def parse(body: Any, kind: Kind) -> Call:
    """The Call for a request body, or ApiError (400) naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN[kind])
    if unknown:
        raise bad_param(unknown[0], "unrecognized request argument")
    for name, defaults in ONLY_DEFAULT.items():
        if name in body and body[name] not in defaults:
            raise bad_param(name, f"is not served; leave it at its default {defaults[-1]!r}")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad_param("best_of", "is not served; leave it unset or equal to n")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "is required: the name of a deployment")
    stream, include_usage = _stream(body)
    return Call(
        kind=kind,
        model=model,
        texts=_texts(body) if kind == "completion" else (),
        messages=_messages(body) if kind == "chat" else (),
        sampling=_sampling(body, kind),
        stream=stream,
        include_usage=include_usage,
        logprobs=_logprobs(body, kind),
    )
