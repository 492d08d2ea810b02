"""The OpenAI-compatible gateway (services/gateway/) on a real HTTP port, called with the
official `openai` client and `curl`, in front of a real registry, rollout and deploy service
serving the tiny model with API keys."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from services.clients.registry import RegistryClient
from services.common.settings import ServerSettings
from services.deploy import app as deploy_app
from services.deploy.settings import DeploySettings
from services.devtools.gateway_thread import GatewayThread
from services.devtools.server_thread import ServerThread
from services.gateway.settings import GatewaySettings
from services.registry import app as registry_app
from services.registry.settings import RegistrySettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from tests.conftest import API_KEYS
from tests.waiting import wait_for
from tlm.common.v1 import common_pb2
from tlm.deploy.v1 import deploy_pb2 as pb
from tlm.deploy.v1 import deploy_pb2_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

KEY = "key-team-a"
SERVICE = {"api_keys": API_KEYS, "service_api_key": "key-service"}
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "The red cat"}]


def metadata(key: str = KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Any]:
    common = {"host": "127.0.0.1", "port": 0, "data_dir": tmp_path_factory.mktemp("gw"), **SERVICE}
    settings = ServerSettings(**common)
    server = ServerThread(
        lambda: [
            registry_app.binding(RegistrySettings(**common)),
            rollout_app.binding(RolloutSettings(**common)),
            deploy_app.binding(DeploySettings(**common, refresh_interval_s=0)),
        ],
        settings,
    ).start()

    async def upload() -> str:
        async with RegistryClient(server.address, api_key=KEY, insecure=True) as registry:
            await registry.create_model("gw", exist_ok=True)
            return (await registry.upload_model_revision("models/gw", tiny_model_dir)).name

    revision = asyncio.run(upload())
    stub = deploy_pb2_grpc.DeploymentServiceStub(grpc.insecure_channel(server.address))
    defaults = pb.SamplingDefaults(max_tokens=3)
    stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            deployment_id="chat",
            deployment=pb.Deployment(model=revision, sampling_defaults=defaults),
        ),
        metadata=metadata(),
        timeout=30,
    )
    get = pb.GetDeploymentRequest(name="deployments/chat")
    wait_for(
        lambda: (
            stub.GetDeployment(get, metadata=metadata(), timeout=30).state
            == pb.Deployment.STATE_READY
        ),
        timeout=120,
        what="deployment READY",
    )
    settings = GatewaySettings(host="127.0.0.1", port=0, **SERVICE)
    gateway = GatewayThread(settings, server.address).start()
    yield server, gateway.url, revision
    gateway.stop()
    server.stop()


@pytest.fixture(scope="module")
def client(stack: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack[1]}/v1", api_key=KEY, max_retries=0)


def direct(address: str, revision: str, *prompts: common_pb2.Prompt, **sampling: Any) -> list[Any]:
    """The same generation straight from the rollout service, by prompt and sample."""
    stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(address))
    request = rollout_pb2.GenerateRequest(
        prompts=prompts, sampling=rollout_pb2.SamplingParams(**sampling), model_revision=revision
    )
    out = [
        c for r in stub.Generate(request, metadata=metadata(), timeout=60) for c in r.completions
    ]
    return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))


def chat_prompt() -> common_pb2.Prompt:
    turns = [common_pb2.ChatMessage(role="user", content="The red cat")]
    return common_pb2.Prompt(messages=common_pb2.Conversation(messages=turns))


def test_chat_completion_equals_the_rollout_output(stack: Any, client: openai.OpenAI) -> None:
    server, _url, revision = stack
    answer = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=6,
        seed=5,
        temperature=0.8,
    )
    (expected,) = direct(
        server.address, revision, chat_prompt(), max_tokens=6, seed=5, temperature=0.8
    )
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason in ("stop", "length") and answer.object == "chat.completion"
    assert answer.model == "chat" and answer.system_fingerprint == revision
    assert answer.usage is not None
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.prompt_tokens > 0


def test_deployment_defaults_apply_when_the_request_leaves_them_out(
    client: openai.OpenAI,
) -> None:
    answer = client.chat.completions.create(model="chat", messages=MESSAGES, seed=1)
    assert answer.usage is not None and answer.usage.completion_tokens <= 3  # max_tokens=3
    longer = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        seed=1,
        max_tokens=12,
        stop=None,
    )
    assert (
        longer.usage is not None
        and longer.usage.completion_tokens >= answer.usage.completion_tokens
    )


def test_completions_with_n_and_several_prompts(stack: Any, client: openai.OpenAI) -> None:
    server, _url, revision = stack
    answer = client.completions.create(
        model="chat", prompt=["The red cat", "What is"], n=2, max_tokens=5, seed=3, logprobs=0
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    prompts = [common_pb2.Prompt(text="The red cat"), common_pb2.Prompt(text="What is")]
    expected = direct(server.address, revision, *prompts, n=2, max_tokens=5, seed=3)
    assert [c.text for c in answer.choices] == [e.text for e in expected]
    first = answer.choices[0]
    assert first.logprobs is not None and first.logprobs.tokens and first.logprobs.token_logprobs
    assert len(first.logprobs.tokens) == len(first.logprobs.token_logprobs)
    assert all(lp is not None and lp <= 0 for lp in first.logprobs.token_logprobs)


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=6,
        seed=9,
        n=2,
    )
    stream = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=6,
        seed=9,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_bytes_with_curl(stack: Any) -> None:
    body = {"model": "chat", "prompt": "The red cat", "max_tokens": 4, "stream": True, "seed": 2}
    headers = ["-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"]
    result = subprocess.run(
        ["curl", "-sN", *headers, "-d", json.dumps(body), f"{stack[1]}/v1/completions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = result.stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    (chunk,) = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 65}, "n"),  # refused by the rollout service, named for the client
        ({"max_tokens": 100000}, "max_tokens"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(
    client: openai.OpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat", messages=MESSAGES, **params)
    assert err.value.status_code == 400
    assert err.value.param == param and param in err.value.message


def test_bad_stream_parameter_is_a_400_before_any_event(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="chat", prompt="x", n=65, stream=True)
    assert err.value.param == "n"


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert err.value.param == "model"


def test_wrong_key_is_a_401_and_teams_are_apart(stack: Any) -> None:
    wrong = openai.OpenAI(base_url=f"{stack[1]}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="chat", messages=MESSAGES)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    other = openai.OpenAI(base_url=f"{stack[1]}/v1", api_key="key-team-b", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model="chat", messages=MESSAGES)
    assert [m.id for m in other.models.list()] == []


def test_models_list_and_get(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["chat"]
    assert client.models.retrieve("chat").id == "chat"
