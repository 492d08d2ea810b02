"""The reward service on a real server: Score, StreamScore, validation, catalogue, load
shedding, deadlines, cache and metrics."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from services.devtools.server_thread import ServerThread
from services.specs.evaluator import validate_json
from tests.reward.conftest import start_reward
from tests.reward.helpers import MATH_SPEC, code_spec, in_flight, sample, spec
from tests.rpc_details import rpc_details
from tests.waiting import wait_for
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

Stub = rs_grpc.RewardServiceStub
GOOD = "<think>1 plus 1</think>\n<answer>$2$</answer>"  # 44 characters


def test_score_inline_spec_hand_checked(reward: Stub) -> None:
    request = rs.ScoreRequest(
        spec=spec(MATH_SPEC),
        samples=[
            sample("good", GOOD, reference="2"),
            sample("wrong", GOOD.replace("$2$", "$3$"), reference="2"),
            sample("no-format", "2", reference="2"),
            sample("no-reference", GOOD),
        ],
    )
    response = reward.Score(request, timeout=30)
    good, wrong, no_format, no_ref = response.results
    # 0.2 * 1 (format) + 1.0 * 1 (math) + 0.5 * 1 (44 chars <= 100) = 1.7
    assert good.status == rs.SCORE_STATUS_OK and good.reward == pytest.approx(1.7)
    assert [s.scorer for s in good.scorers] == ["format", "correct", "short"]
    assert wrong.reward == pytest.approx(0.7)
    assert (no_format.reward, no_format.gate) == (-1.0, "format")
    # No reference: UNSCORABLE, and no reward on the wire (never a zero); OK ones carry theirs,
    # the gate's -1 included.
    assert no_ref.status == rs.SCORE_STATUS_UNSCORABLE and not no_ref.HasField("reward")
    assert good.HasField("reward") and no_format.HasField("reward")
    assert "reference" in no_ref.reason
    assert response.evaluator_revision == ""


def test_invalid_inline_spec_is_invalid_argument_with_paths(reward: Stub) -> None:
    bad = spec({"scorers": [{"name": "r", "regex": {"pattern": "(?<=a)b"}}]})
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(rs.ScoreRequest(spec=bad, samples=[sample("a", "b")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rpc_details(err.value)
    assert details.fields == ["scorers[0].regex.pattern"] and details.reason == "EVALUATOR_INVALID"


def test_validate_evaluator_json(reward: Stub) -> None:
    text = json.dumps({"scorers": [{"name": "a", "regex": {"pattern": "x", "colour": 1}}]})
    response = reward.ValidateEvaluator(rs.ValidateEvaluatorRequest(spec_json=text), timeout=10)
    assert not response.valid
    assert [(e.path, e.message[:13]) for e in response.errors] == [
        ("scorers[0].regex.colour", "unknown field")
    ]
    ok = json.dumps(MATH_SPEC)
    response = reward.ValidateEvaluator(rs.ValidateEvaluatorRequest(spec_json=ok), timeout=10)
    assert response.valid and response.normalized.scorers[2].length.penalty_per_unit == 0.01
    assert json.loads(response.normalized_json)["scorers"][0]["timeout"] == "10s"


# Specs the security review found accepted: an unknown enum number, a dataset that is a path, a
# timeout of 31 years, a model revision that is a path.
REVIEWED = [
    ({"aggregation": 99, "scorers": [{"name": "a", "math": {}}]}, "aggregation"),
    ({"scorers": [{"name": "h", "human": {"dataset": "../x"}}]}, "scorers[0].human.dataset"),
    ({"scorers": [{"name": "t", "timeout": "1000000000s", "math": {}}]}, "scorers[0].timeout"),
    (
        {"scorers": [{"name": "m", "model": {"model_revision": "models/rm/revisions/../../x"}}]},
        "scorers[0].model.model_revision",
    ),
]


@pytest.mark.parametrize(("data", "path"), REVIEWED)
def test_reviewed_specs_are_refused_with_their_path(reward: Stub, data: dict, path: str) -> None:
    """ValidateEvaluator reports them (valid false, the path); Score is INVALID_ARGUMENT with the
    path as the BadRequest field violation."""
    request = rs.ValidateEvaluatorRequest(spec_json=json.dumps(data))
    response = reward.ValidateEvaluator(request, timeout=10)
    assert not response.valid and [e.path for e in response.errors] == [path]
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(rs.ScoreRequest(spec=spec(data), samples=[sample("a", "b")]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == [path]


def violation_fields(err: grpc.RpcError) -> list[str]:
    return rpc_details(err).fields


def test_list_scorer_types_examples_are_valid_specs(reward: Stub) -> None:
    response = reward.ListScorerTypes(rs.ListScorerTypesRequest(), timeout=10)
    types = {t.type: t for t in response.scorer_types}
    assert len(types) == 12 and types["model"].family == rs.SCORER_FAMILY_MODEL
    assert types["regex"].deterministic and not types["code"].deterministic
    for t in response.scorer_types:
        example = json.loads(t.example_json)
        result = validate_json(json.dumps({"scorers": [example]}))
        assert result.valid, (t.type, result.errors)
    length = {p.name: p for p in types["length"].parameters}
    assert length["max_length"].required and length["max_length"].minimum == 1
    code = {p.name: p for p in types["code"].parameters}
    assert (code["memory_mb"].minimum, code["memory_mb"].maximum) == (64, 4096)  # BOUNDS
    assert code["timeout"].maximum == 60 and not code["timeout"].HasField("minimum")
    assert length["unit"].enum_values == [
        "LENGTH_UNIT_CHARACTERS",
        "LENGTH_UNIT_WORDS",
        "LENGTH_UNIT_TOKENS",
    ]
    assert json.loads(length["penalty_per_unit"].default_json) == 0.01
    common = {p.name for p in response.common_parameters}
    assert {"name", "weight", "timeout", "fallback", "normalization.clip_max"} <= common


def test_deterministic_results_are_cached_and_counted(reward: Stub) -> None:
    request = rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "r", "regex": {"pattern": "cache-me-[0-9]+"}}]}),
        samples=[sample("a", "cache-me-42")],
    )
    labels = {"scorer_type": "regex", "status": "OK", "cached": "true"}
    before = REGISTRY.get_sample_value("tlm_reward_scorer_results_total", labels) or 0.0
    first = reward.Score(request, timeout=10).results[0].scorers[0]
    second = reward.Score(request, timeout=10).results[0].scorers[0]
    assert (first.cached, second.cached) == (False, True)
    assert first.value == second.value == 1.0
    after = REGISTRY.get_sample_value("tlm_reward_scorer_results_total", labels)
    assert after == before + 1


def test_stream_score_returns_every_sample(reward: Stub) -> None:
    config = rs.ScoreRequest(spec=spec(MATH_SPEC))

    def requests():  # type: ignore[no-untyped-def]
        yield rs.StreamScoreRequest(config=config)
        for i in range(5):
            yield rs.StreamScoreRequest(sample=sample(f"s{i}", GOOD, reference=str(2 + i % 2)))

    results = {r.result.sample_id: r.result for r in reward.StreamScore(requests(), timeout=30)}
    assert set(results) == {f"s{i}" for i in range(5)}
    assert results["s0"].reward == pytest.approx(1.7)
    assert results["s1"].reward == pytest.approx(0.7)


def test_stream_score_needs_config_first(reward: Stub) -> None:
    def requests():  # type: ignore[no-untyped-def]
        yield rs.StreamScoreRequest(sample=sample("a", "x"))

    with pytest.raises(grpc.RpcError) as err:
        list(reward.StreamScore(requests(), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_is_honoured_with_timeout_results(reward: Stub) -> None:
    request = rs.ScoreRequest(
        spec=code_spec(timeout="20s"),
        samples=[sample("slow", "import time\ntime.sleep(30)", tests="")],
    )
    start = time.monotonic()
    response = reward.Score(request, timeout=2.0)
    assert time.monotonic() - start < 2.0
    assert response.results[0].status == rs.SCORE_STATUS_TIMEOUT


def test_overload_is_resource_exhausted(tmp_path: Path) -> None:
    server = start_reward(tmp_path, max_concurrent_requests=1)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            slow = rs.ScoreRequest(
                spec=code_spec(timeout="3s"),
                samples=[sample("slow", "import time\ntime.sleep(1.5)", tests="")],
            )
            worker = threading.Thread(target=lambda: stub.Score(slow, timeout=30))
            before = in_flight()
            worker.start()
            wait_for(lambda: in_flight() == before + 1, timeout=5, what="the slow call admitted")
            quick = rs.ScoreRequest(spec=spec(MATH_SPEC), samples=[sample("q", GOOD)])
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(quick, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            worker.join()
            assert stub.Score(quick, timeout=10).results[0].sample_id == "q"
    finally:
        server.stop()


def test_too_many_samples_and_duplicate_ids(reward: Stub) -> None:
    request = rs.ScoreRequest(spec=spec(MATH_SPEC), samples=[sample("a", "x"), sample("a", "y")])
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "samples[1].sample_id" in (err.value.details() or "")


def test_score_through_embedded_services_with_a_process_pool(embedded: ServerThread) -> None:
    with grpc.insecure_channel(embedded.address) as channel:
        stub = rs_grpc.RewardServiceStub(channel)
        request = rs.ScoreRequest(spec=spec(MATH_SPEC), samples=[sample("a", GOOD, reference=2)])
        result = stub.Score(request, timeout=60).results[0]
    assert result.status == rs.SCORE_STATUS_OK and result.reward == pytest.approx(1.7)
