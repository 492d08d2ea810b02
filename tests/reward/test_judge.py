"""The judge scorer: score parsing and mapping by hand, then through the embedded services
with a judge model served by rollout.

The tiny LM writes repetitive non-digit text, so a score pattern would never match. The test
judge is the tiny LM with its output layer rewritten to write only digits: the final norm keeps
one hidden dimension d, and the (untied) output rows are +10 e_d for "7", -10 e_d for "3" and
0 for every other token, so each greedy step writes "7" when h_d > 0 and "3" otherwise. The
score is then always parsable, and which digit comes out is read from a direct Generate call."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import json_format
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.reward import convert
from services.reward.domain import Sample, Status
from services.reward.engine import ScoreContext
from services.reward.judge import JudgeScorerAdapter, fill_rubric, judge_request, parse_score
from services.specs.evaluator import require_valid
from tests.reward.helpers import sample, spec
from tests.reward.test_remote import dead_address
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Services of its own: the judge model this module loads for its team must not hold the
    shared server's rollout replica (another team may only replace an idle model)."""
    from tests.conftest import API_KEYS, start_embedded

    # API keys, not keyless mode: the no-judge test needs a second team, and keyless mode serves
    # every caller as team `dev`.
    server = start_embedded(tmp_path_factory.mktemp("judge"), api_keys=API_KEYS)
    yield server
    server.stop()


MD = (("authorization", "Bearer key-team-a"),)
RUBRIC = "Rate 0-9.\nQ: {prompt}\nA: {completion}\nReference: {reference}\nScore:"


@pytest.mark.parametrize(
    ("text", "low", "high", "raw"),
    [
        ("Score: 7", 0, 10, 0.7),
        ("score = 2.5 because", 0, 5, 0.5),
        ("Score: -1", -1, 1, 0.0),
        ("SCORE:10", 0, 10, 1.0),
    ],
)
def test_scores_map_linearly_to_unit_range(text: str, low: float, high: float, raw: float) -> None:
    pattern = r"(?i)score\s*[:=]\s*(-?[0-9.]+)"
    assert parse_score(text, pattern, low, high).raw == pytest.approx(raw)


@pytest.mark.parametrize(
    ("text", "pattern", "why"),
    [
        ("I like it", r"Score: (\d+)", "has no score"),
        ("Score: 11", r"Score: (\d+)", "outside [0, 10]"),
        ("Score: 1.2.3", r"Score: ([0-9.]+)", "not a number"),
        ("Score: x", r"Score: (\d)?", "has no score"),  # optional group did not take part
    ],
)
def test_unparsable_or_out_of_range_is_unscorable(text: str, pattern: str, why: str) -> None:
    outcome = parse_score(text, pattern, 0, 10)
    assert outcome.status == Status.UNSCORABLE and why in outcome.reason


def test_rubric_placeholders() -> None:
    s = Sample("a", "x = 4", metadata={"reference": "4"})
    assert fill_rubric("{completion} vs {reference}; {{}}", s) == "x = 4 vs 4; {{}}"


def test_a_completion_cannot_inject_the_reference() -> None:
    s = Sample("a", "my answer: {reference}", metadata={"reference": "SECRET"})
    assert fill_rubric("A: {completion}\nRef: {reference}", s) == (
        "A: my answer: {reference}\nRef: SECRET"
    )


def digit_judge(source: Path, out: Path) -> Path:
    model: Any = AutoModelForCausalLM.from_pretrained(source, tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    seven, three = tokenizer.convert_tokens_to_ids(["7", "3"])
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[seven, 0] = 10.0
        model.lm_head.weight[three, 0] = -10.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge_loaded(embedded: ServerThread, tiny_model_dir: Path, tmp_path_factory: Any) -> str:
    folder = digit_judge(tiny_model_dir, tmp_path_factory.mktemp("judge"))
    model_id = f"judge-{uuid.uuid4().hex[:8]}"

    async def push() -> str:
        registry = RegistryClient(embedded.address, api_key="key-team-a")
        try:
            request = registry_pb2.CreateModelRequest(model_id=model_id)
            await registry.stub.CreateModel(request, metadata=registry.metadata())
            return (await registry.upload_model_revision(f"models/{model_id}", folder)).name
        finally:
            await registry.close()

    revision = asyncio.run(push())
    with grpc.insecure_channel(embedded.address) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        load = rollout_pb2.LoadModelRequest(model_revision=revision)
        rollout.LoadModel(load, metadata=MD, timeout=120)
    return revision


def judge_scorer(name: str, **judge: Any) -> dict[str, Any]:
    return {"name": name, "judge": {"rubric": RUBRIC, "max_tokens": 3, **judge}}


@pytest.mark.slow  # generates with the judge model
def test_judge_through_rollout(embedded: ServerThread, judge_loaded: str) -> None:
    digits = {"score_pattern": "([0-9])", "score_min": 0, "score_max": 9}
    evaluator = {
        "scorers": [
            judge_scorer("judge", **digits),
            # Monitors: the default pattern wants "Score: N", the judge writes digits only.
            {**judge_scorer("wants-label"), "monitor_only": True},
            {**judge_scorer("narrow", **(digits | {"score_max": 2})), "monitor_only": True},
        ]
    }
    samples = [sample("a", "2", reference="2"), sample("b", "It is 3.", reference="2")]
    with grpc.insecure_channel(embedded.address) as channel:
        reward = rs_grpc.RewardServiceStub(channel)
        request = rs.ScoreRequest(spec=spec(evaluator), samples=samples)
        results = reward.Score(request, metadata=MD, timeout=120).results
        # The judge's own words for the same prompts, read directly from rollout.
        cfg = require_valid(spec(evaluator)).scorers[0].judge
        direct = judge_request(cfg, [convert.sample_from_proto(s) for s in samples])
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        texts = {
            c.prompt_index: c.text
            for r in rollout.Generate(direct, metadata=MD, timeout=60)
            for c in r.completions
        }
    for i, result in enumerate(results):
        judge, label, narrow = result.scorers
        assert texts[i] and set(texts[i]) <= {"3", "7"}
        assert result.status == rs.SCORE_STATUS_OK and judge.status == rs.SCORE_STATUS_OK
        assert judge.raw_value == pytest.approx(int(texts[i][0]) / 9)
        assert label.status == rs.SCORE_STATUS_UNSCORABLE and "no score matching" in label.reason
        assert narrow.status == rs.SCORE_STATUS_UNSCORABLE and "outside [0, 2]" in narrow.reason


def test_judge_errors_when_no_model_is_loaded(embedded: ServerThread) -> None:
    with grpc.insecure_channel(embedded.address) as channel:
        reward = rs_grpc.RewardServiceStub(channel)
        evaluator = spec({"scorers": [judge_scorer("judge")]})
        request = rs.ScoreRequest(spec=evaluator, samples=[sample("a", "2")])
        metadata = (("authorization", "Bearer key-team-b"),)  # a team without a judge
        result = reward.Score(request, metadata=metadata, timeout=60).results[0]
        assert result.status == rs.SCORE_STATUS_ERROR
        assert result.scorers[0].reason.startswith("rollout ")
        assert "FAILED_PRECONDITION" in result.reason


def test_a_spec_chosen_rollout_address_is_refused(embedded: ServerThread) -> None:
    """The service key acts for any team: it goes only to the configured rollout address."""
    down = spec({"scorers": [judge_scorer("judge", rollout_address=dead_address())]})
    with grpc.insecure_channel(embedded.address) as channel:
        reward = rs_grpc.RewardServiceStub(channel)
        request = rs.ScoreRequest(spec=down, samples=[sample("a", "2")])
        with pytest.raises(grpc.RpcError) as err:
            reward.Score(request, metadata=MD, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scorers[0].judge.rollout_address" in (err.value.details() or "")


def test_judge_adapter_sends_no_key_to_an_unlisted_address() -> None:
    calls: list[dict[str, str]] = []

    class Rollout(rollout_pb2_grpc.RolloutServiceServicer):
        async def Generate(self, request: Any, context: Any) -> Any:
            calls.append(dict(context.invocation_metadata()))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake")
            yield rollout_pb2.GenerateResponse()

    async def body() -> list[Any]:
        server = grpc.aio.server()
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(Rollout(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            ctx = ScoreContext(team="t", deadline=time.monotonic() + 10)
            scorer = json_format.ParseDict(
                judge_scorer("j", rollout_address=address), ev.ScorerSpec()
            )
            refused = await JudgeScorerAdapter("SERVICE-KEY", "127.0.0.1:1").score(
                scorer, [Sample("a", "x")], ctx
            )
            listed = JudgeScorerAdapter("SERVICE-KEY", "127.0.0.1:1", [address])
            allowed = await listed.score(scorer, [Sample("a", "x")], ctx)
            await listed.close()
            return refused + allowed
        finally:
            await server.stop(None)

    refused, allowed = asyncio.run(body())
    assert refused.status == Status.ERROR and "rollout_address" in refused.reason
    assert allowed.status == Status.ERROR and "UNAVAILABLE" in allowed.reason
    # Only the listed address was called (the client retried its UNAVAILABLE), with the key.
    assert calls and {c.get("authorization") for c in calls} == {"Bearer SERVICE-KEY"}
