"""OpenAI request bodies -> Call (services/gateway/calls.py), pure: what is served, what is
refused and which parameter the refusal names."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.calls import Sampling, parse
from services.gateway.errors import ApiError


def refused(body: Any, kind: str = "chat") -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(body, kind)  # type: ignore[arg-type]
    assert err.value.status == 400
    return err.value


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_with_text_parts_developer_role_and_defaults() -> None:
    call = parse(
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [
                        {"type": "text", "text": "Be "},
                        {"type": "text", "text": "brief."},
                    ],
                },
                {"role": "user", "content": "hi"},
            ],
            "max_completion_tokens": 7,
            "stop": "\n",
            "presence_penalty": 0,  # the default: accepted
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "chat",
    )
    assert call.messages == (("system", "Be brief."), ("user", "hi"))
    assert call.sampling == Sampling(max_tokens=7, stop=("\n",))
    assert call.stream and call.include_usage and not call.logprobs


def test_completion_prompts_and_logprobs_zero() -> None:
    call = parse({"model": "m", "prompt": ["a", "b"], "n": 3, "logprobs": 0}, "completion")
    assert call.texts == ("a", "b") and call.sampling.n == 3 and call.logprobs
    assert call.prompt_count == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temprature": 1}, "temprature"),  # unknown: OpenAI refuses it too
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": True}, "temperature"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "seed": 1.5}, "seed"),
        ({**CHAT, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**CHAT, "logprobs": 1}, "logprobs"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
        ),
        ({"messages": CHAT["messages"]}, "model"),
    ],
)
def test_chat_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),  # token ids are not served
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "suffix": "end"}, "suffix"),
    ],
)
def test_completion_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(body, "completion").param == param


def test_a_body_that_is_no_object_is_refused() -> None:
    assert refused([1, 2]).param is None
