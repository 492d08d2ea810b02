"""RolloutService on a real server (port 0) over local weights: errors, streaming, hot-swap,
cancellation and load shedding."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tests.conftest import API_KEYS
from tests.rollout.conftest import (
    FOREIGN_LORA,
    LORA_R1,
    LORA_R2,
    MODEL,
    NO_CHAT_MODEL,
    OTHER_MODEL,
    STRICT_CHAT_MODEL,
    RolloutServerFactory,
)
from tests.rpc_details import rpc_details
from tests.waiting import wait_for
from tlm.common.v1 import common_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

Sampling = rollout_pb2.SamplingParams


def stub_for(address: str) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(address))


def request(*texts: str, adapter: str = "", **sampling: object) -> rollout_pb2.GenerateRequest:
    return rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=t) for t in texts],
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
        adapter_revision=adapter,
    )


def collect(responses) -> list[rollout_pb2.Completion]:  # type: ignore[no-untyped-def]
    out = [c for r in responses for c in r.completions]
    return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))


def violations(err: grpc.RpcError) -> list[str]:
    return rpc_details(err).fields


@pytest.fixture
def stub(rollout_server: RolloutServerFactory) -> rollout_pb2_grpc.RolloutServiceStub:
    return stub_for(rollout_server().address)


def test_generate_needs_a_loaded_model(stub: rollout_pb2_grpc.RolloutServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request("hi"), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), timeout=10)
    assert status.engine == "transformers" and status.model_revision == ""


def test_load_generate_and_status(stub: rollout_pb2_grpc.RolloutServiceStub) -> None:
    loaded = stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision="models/tiny"), timeout=60)
    assert loaded.policy_version == MODEL  # the alias resolved
    assert loaded.status.max_model_len == 512 and loaded.status.max_n == 64
    req = request("The red cat", "What is", n=2, max_tokens=8, seed=11)
    req.return_prompt_token_ids = True
    first = collect(stub.Generate(req, timeout=60))
    assert [(c.prompt_index, c.sample_index) for c in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c.policy_version == MODEL and c.prompt_token_ids for c in first)
    assert all(len(c.logprobs) == len(c.token_ids) for c in first)
    assert all(
        c.finish_reason in (rollout_pb2.FINISH_REASON_STOP, rollout_pb2.FINISH_REASON_LENGTH)
        for c in first
    )
    assert [c.token_ids for c in collect(stub.Generate(req, timeout=60))] == [
        c.token_ids for c in first
    ]
    chat = rollout_pb2.GenerateRequest(
        prompts=[
            common_pb2.Prompt(
                messages=common_pb2.Conversation(
                    messages=[common_pb2.ChatMessage(role="user", content="hi")]
                )
            )
        ],
        sampling=Sampling(max_tokens=4),
    )
    assert len(collect(stub.Generate(chat, timeout=60))) == 1
    status = stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), timeout=10)
    assert status.model_revision == MODEL and status.generated_tokens_total > 0
    assert status.tokens_per_second > 0 and status.running == 0 and status.queue_depth == 0


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request("hi", n=0), "sampling.n"),
        (request("hi", n=65), "sampling.n"),
        (request("hi", max_tokens=600), "sampling.max_tokens"),
        (request("hi", temperature=-1.0), "sampling.temperature"),
        (request("hi", temperature=float("inf")), "sampling.temperature"),
        (request("hi", temperature=float("nan")), "sampling.temperature"),
        (request("hi", temperature=2.5), "sampling.temperature"),
        (request("hi", n=2, temperature=0.0), "sampling.n"),
        (request("hi", top_p=0.0), "sampling.top_p"),
        (request("hi", top_p=1.01), "sampling.top_p"),
        (request("a", "b", "c", ""), "prompts[3]"),
        (request("a", "cat " * 600), "prompts[1]"),
        (request("a", "cat " * 250, max_tokens=300), "prompts[1]"),
        (rollout_pb2.GenerateRequest(), "prompts"),
        (request("hi", adapter="models/nope-lora/revisions/r1"), "adapter_revision"),
        (request("hi", logprobs_mode=7), "sampling.logprobs_mode"),  # a number we do not know
        (  # greedy decoding has no temperature to scale by
            request(
                "hi", temperature=0.0, logprobs_mode=rollout_pb2.LOGPROBS_MODE_TEMPERATURE_SCALED
            ),
            "sampling.logprobs_mode",
        ),
    ],
)
def test_bad_generate_requests_name_the_field(
    stub: rollout_pb2_grpc.RolloutServiceStub, req: rollout_pb2.GenerateRequest, field: str
) -> None:
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == [field]
    # The engine keeps serving.
    assert len(collect(stub.Generate(request("hi", max_tokens=2), timeout=60))) == 1


def test_bad_loads(stub: rollout_pb2_grpc.RolloutServiceStub) -> None:
    cases = [
        (rollout_pb2.LoadModelRequest(model_revision="models/nope/revisions/r1"), "model_revision"),
        (rollout_pb2.LoadModelRequest(model_revision=LORA_R1), "model_revision"),
        (rollout_pb2.LoadModelRequest(model_revision=MODEL, dtype="int3"), "dtype"),
        (rollout_pb2.LoadModelRequest(model_revision=MODEL, max_model_len=4096), "max_model_len"),
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violations(err.value) == [field]
    adapter = rollout_pb2.LoadAdapterRequest(adapter_revision=LORA_R1)
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadAdapter(adapter, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # no model yet
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadAdapter(rollout_pb2.LoadAdapterRequest(adapter_revision=FOREIGN_LORA), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # trained on OTHER_MODEL
    assert OTHER_MODEL in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadAdapter(rollout_pb2.LoadAdapterRequest(adapter_revision="models/x"), timeout=60)
    assert violations(err.value) == ["adapter_revision"]
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadAdapter(rollout_pb2.UnloadAdapterRequest(adapter_revision=LORA_R1), timeout=9)
    assert violations(err.value) == ["adapter_revision"]


@pytest.mark.slow  # generates with the tiny model and two adapters
def test_adapter_hot_swap_while_a_request_is_in_flight(
    stub: rollout_pb2_grpc.RolloutServiceStub,
) -> None:
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), timeout=60)
    assert (
        stub.LoadAdapter(rollout_pb2.LoadAdapterRequest(adapter_revision=LORA_R1)).policy_version
        == LORA_R1
    )
    long = request("The red cat", "Anna", adapter="models/tiny-lora", n=8, max_tokens=400, seed=2)
    short = request("The red cat", adapter="models/tiny-lora", n=2, max_tokens=12, seed=3)
    reference_long = collect(stub.Generate(long, timeout=120))  # on r1, nothing else running
    on_r1 = collect(stub.Generate(short, timeout=60))

    in_flight = stub.Generate(long, timeout=120)
    wait_for(lambda: stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest()).running == 1)
    swapped = stub.LoadAdapter(rollout_pb2.LoadAdapterRequest(adapter_revision=LORA_R2))
    assert swapped.policy_version == LORA_R2
    status = stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest())
    assert status.running == 1, "the long request should still be running after the swap"
    assert [a.adapter_revision for a in status.adapters] == [LORA_R2]
    on_r2 = collect(stub.Generate(short, timeout=60))

    finished = collect(in_flight)  # started on r1: finishes on r1, unchanged
    assert {c.policy_version for c in finished} == {LORA_R1}
    assert [c.token_ids for c in finished] == [c.token_ids for c in reference_long]
    assert {c.policy_version for c in on_r2} == {LORA_R2}
    assert [c.token_ids for c in on_r2] != [c.token_ids for c in on_r1]
    stub.UnloadAdapter(rollout_pb2.UnloadAdapterRequest(adapter_revision="models/tiny-lora"))
    base = collect(stub.Generate(request("The red cat", n=2, max_tokens=12, seed=3)))
    assert {c.policy_version for c in base} == {MODEL}


def test_cancellation_frees_the_slot_and_a_full_queue_sheds_load(
    rollout_server: RolloutServerFactory,
) -> None:
    stub = stub_for(rollout_server(max_queue=1).address)
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), timeout=60)

    def status() -> rollout_pb2.EngineStatus:
        return stub.GetEngineStatus(rollout_pb2.GetEngineStatusRequest(), timeout=10)

    long = request("The red cat", n=16, max_tokens=500, seed=1)
    call = stub.Generate(long, timeout=120)
    wait_for(lambda: status().running == 1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request("hi", max_tokens=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    call.cancel()
    wait_for(lambda: status().running == 0 and status().queue_depth == 0, timeout=30)

    def settled() -> bool:
        before = status().generated_tokens_total
        time.sleep(0.3)
        return status().generated_tokens_total == before

    # Generation stopped: once the step in progress is counted, the token counter stands still,
    # short of the whole request.
    wait_for(settled, timeout=30, what="the token counter stands still")
    assert status().generated_tokens_total < 16 * 500
    assert len(collect(stub.Generate(request("hi", max_tokens=2), timeout=60))) == 1

    # An expired deadline stops the generation the same way.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long, timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: status().running == 0, timeout=30)
    assert len(collect(stub.Generate(request("hi", max_tokens=2), timeout=60))) == 1


def test_requests_arriving_together_stream_as_they_finish(
    stub: rollout_pb2_grpc.RolloutServiceStub,
) -> None:
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), timeout=60)
    alone = collect(stub.Generate(request("The red cat", n=4, max_tokens=30, seed=8), timeout=60))
    results: dict[int, list[rollout_pb2.Completion]] = {}

    def worker(i: int) -> None:
        results[i] = collect(
            stub.Generate(request("The red cat", n=4, max_tokens=30, seed=8), timeout=60)
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all([c.token_ids for c in r] == [c.token_ids for c in alone] for r in results.values())
    # Completions of one call may arrive in several messages, each as its rows finish.
    early = request("The red cat", n=8, max_tokens=60, seed=8, stop=["e"])
    messages = list(stub.Generate(early, timeout=60))
    assert sum(len(m.completions) for m in messages) == 8


def chat(*turns: tuple[str, str], max_tokens: int = 4) -> rollout_pb2.GenerateRequest:
    messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return rollout_pb2.GenerateRequest(
        prompts=[
            common_pb2.Prompt(text="hi"),
            common_pb2.Prompt(messages=common_pb2.Conversation(messages=messages)),
        ],
        sampling=Sampling(max_tokens=max_tokens),
    )


@pytest.mark.parametrize(
    ("model", "role"), [(NO_CHAT_MODEL, "user"), (STRICT_CHAT_MODEL, "system")]
)
def test_chat_prompts_the_template_cannot_render_are_invalid(
    stub: rollout_pb2_grpc.RolloutServiceStub, model: str, role: str
) -> None:
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=model), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(chat((role, "be brief"), ("user", "hi")), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == ["prompts[1]"]
    if model == STRICT_CHAT_MODEL:  # roles it accepts still render
        assert len(collect(stub.Generate(chat(("user", "hi")), timeout=60))) == 2


def team(name: str) -> tuple[tuple[str, str], ...]:
    """A team's key (tests.conftest.API_KEYS): keyless servers serve everyone as "dev"."""
    return (("authorization", f"Bearer key-{name}"),)


def test_each_team_has_its_own_models_and_sees_only_them(
    rollout_server: RolloutServerFactory,
) -> None:
    """LoadModel is a per-team warm-up: two teams' models sit side by side in the cache, a
    request without model_revision runs on its own team's, and a team sees only its own."""
    stub = stub_for(rollout_server(api_keys=API_KEYS).address)
    a, b = team("team-a"), team("team-b")
    get = rollout_pb2.GetEngineStatusRequest()
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL), metadata=a, timeout=60)
    collect(stub.Generate(request("hi", max_tokens=2), metadata=a, timeout=60))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request("hi", max_tokens=2), metadata=b, timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no model is loaded for your team" in (err.value.details() or "")
    other = stub.GetEngineStatus(get, metadata=b, timeout=10)
    assert (other.engine, other.device, other.max_queue, other.max_n) == (
        "transformers",
        "cpu",
        256,
        64,
    )
    assert other.model_revision == "" and other.generated_tokens_total == 0
    assert other.max_model_len == 0 and not other.adapters and not other.cached_models
    stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=OTHER_MODEL), metadata=b, timeout=60)
    (mine,) = collect(stub.Generate(request("hi", max_tokens=2), metadata=a, timeout=60))
    (theirs,) = collect(stub.Generate(request("hi", max_tokens=2), metadata=b, timeout=60))
    assert (mine.policy_version, theirs.policy_version) == (MODEL, OTHER_MODEL)
    owner = stub.GetEngineStatus(get, metadata=a, timeout=10)
    assert owner.model_revision == MODEL and list(owner.cached_models) == [MODEL]
    assert owner.generated_tokens_total > 0 and owner.cache_bytes > 0
