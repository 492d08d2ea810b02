"""Completions -> OpenAI response bodies and stream chunks (pure; no HTTP).

Choices are numbered prompt by prompt, `n` per prompt (choice `i * n + j` is sample j of prompt
i), as OpenAI numbers them. Log-probabilities are those of the sampled tokens; tokens are named
`token_id:{id}` (as vLLM's `--return-tokens-as-token-ids` does), since the gateway holds no
tokenizer: the rollout replica that generated them does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.gateway.calls import Call
from tlm.rollout.v1 import rollout_pb2

FINISH = {
    rollout_pb2.FINISH_REASON_STOP: "stop",
    rollout_pb2.FINISH_REASON_LENGTH: "length",
    rollout_pb2.FINISH_REASON_ABORT: "abort",  # cancelled or past its deadline
}
OBJECT = {
    ("completion", False): "text_completion",
    ("completion", True): "text_completion",
    ("chat", False): "chat.completion",
    ("chat", True): "chat.completion.chunk",
}


def token(token_id: int) -> str:
    return f"token_id:{token_id}"


def index(c: rollout_pb2.Completion, n: int) -> int:
    return c.prompt_index * n + c.sample_index


def _completion_logprobs(c: rollout_pb2.Completion) -> dict[str, Any]:
    return {
        "tokens": [token(t) for t in c.token_ids],
        "token_logprobs": list(c.logprobs),
        "top_logprobs": None,
        "text_offset": None,
    }


def _chat_logprobs(c: rollout_pb2.Completion) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"token": token(t), "logprob": lp, "bytes": None, "top_logprobs": []}
        for t, lp in zip(c.token_ids, c.logprobs, strict=True)
    ]
    return {"content": content, "refusal": None}


def choice(call: Call, c: rollout_pb2.Completion) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response."""
    out: dict[str, Any] = {
        "index": index(c, call.sampling.n),
        "finish_reason": FINISH[c.finish_reason],
    }
    if call.kind == "completion":
        out["text"] = c.text
        out["logprobs"] = _completion_logprobs(c) if call.logprobs else None
    else:
        out["message"] = {"role": "assistant", "content": c.text}
        out["logprobs"] = _chat_logprobs(c) if call.logprobs else None
    return out


def usage(completions: Sequence[rollout_pb2.Completion]) -> dict[str, int]:
    """Tokens: each prompt counted once, every completion's own."""
    prompts = {c.prompt_index: len(c.prompt_token_ids) for c in completions}
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def header(
    call: Call, response_id: str, created: int, model: str, fingerprint: str
) -> dict[str, Any]:
    """What every body and chunk starts with; `fingerprint` names the revision that serves."""
    return {
        "id": response_id,
        "object": OBJECT[(call.kind, call.stream)],
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
    }


def whole(
    call: Call, head: dict[str, Any], completions: Sequence[rollout_pb2.Completion]
) -> dict[str, Any]:
    """The response body of a request that does not stream."""
    ordered = sorted(completions, key=lambda c: index(c, call.sampling.n))
    return head | {"choices": [choice(call, c) for c in ordered], "usage": usage(completions)}


def chunks(call: Call, head: dict[str, Any], c: rollout_pb2.Completion) -> list[dict[str, Any]]:
    """The stream chunks of one finished completion: for chat, the role, then the text, then
    the finish reason (as OpenAI streams them); for completions, the text with its reason."""
    i = index(c, call.sampling.n)
    finish = FINISH[c.finish_reason]
    if call.kind == "completion":
        logprobs = _completion_logprobs(c) if call.logprobs else None
        part = {"index": i, "text": c.text, "finish_reason": finish, "logprobs": logprobs}
        return [head | {"choices": [part]}]
    logprobs = _chat_logprobs(c) if call.logprobs else None
    parts = [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
        {"index": i, "delta": {"content": c.text}, "finish_reason": None, "logprobs": logprobs},
        {"index": i, "delta": {}, "finish_reason": finish},
    ]
    return [head | {"choices": [p]} for p in parts]
