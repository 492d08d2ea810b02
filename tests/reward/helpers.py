"""Builders shared by the reward API tests."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs

MATH_SPEC: dict[str, Any] = {
    "scorers": [
        {"name": "format", "weight": 0.2, "format": {"tags": ["think", "answer"]}},
        {"name": "correct", "weight": 1.0, "math": {"extraction": {"tag": "answer"}}},
        {"name": "short", "weight": 0.5, "length": {"max_length": 100, "penalty_per_unit": 0.01}},
    ],
    "gates": [{"scorer": "format", "reward": -1.0}],
}


def spec(data: dict[str, Any]) -> ev.EvaluatorSpec:
    return json_format.Parse(json.dumps(data), ev.EvaluatorSpec())


def sample(sample_id: str, completion: str, **metadata: Any) -> rs.Sample:
    msg = rs.Sample(sample_id=sample_id, completion=completion)
    msg.prompt.text = "What is 1 + 1?"
    if metadata:
        msg.metadata.update(metadata)
    return msg


def code_spec(**code: Any) -> ev.EvaluatorSpec:
    return spec({"scorers": [{"name": "tests", "code": code}]})


def in_flight() -> float:
    """Score calls admitted by the reward services of this process (their in-flight gauge)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tlm_reward_requests_in_flight") or 0.0
