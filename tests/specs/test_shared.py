"""What several services share lives in `services/specs`, not in one service's internals: the
registry validates evaluator specs without importing the reward service, and the rollout and
the trainer apply one set of sampling rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from services.specs import sampling

SERVICES = Path(__file__).parents[2] / "services"
OTHERS = ("registry", "reward", "rollout", "trainer")


def imported(package: str) -> set[str]:
    """Every module the package's files import (absolute names)."""
    names: set[str] = set()
    for path in (SERVICES / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["specs", "registry", "reward"])
def test_no_service_internals_are_imported(package: str) -> None:
    others = [f"services.{o}" for o in OTHERS if o != package]
    crossing = sorted(m for m in imported(package) if m.startswith(tuple(others)))
    assert crossing == []


def test_rollout_and_trainer_check_sampling_with_one_set_of_rules() -> None:
    from services.rollout import domain
    from services.trainer.params import Sampling

    assert domain.SamplingSpec is sampling.SamplingSpec
    assert issubclass(Sampling, sampling.SamplingSpec)
    bad = Sampling(n=2, temperature=0.0)  # greedy decoding with n > 1
    assert [v.field for v in bad.violations("grpo.sampling")] == ["grpo.sampling.n"]
    assert [v.field for v in bad.problems(8, 128)] == ["sampling.n"]


def test_the_registry_stores_specs_as_the_reward_service_validates_them() -> None:
    from services.registry.app import validate_evaluator_json
    from services.specs.evaluator import EvaluatorInvalid, validate_json

    text = '{"scorers": [{"name": "short", "length": {"max_length": 10}}]}'
    stored = validate_evaluator_json(text)
    assert stored == validate_json(text).normalized
    assert stored.scorers[0].weight == 1.0  # defaults filled in, as the reward service runs it
    with pytest.raises(EvaluatorInvalid) as err:
        validate_evaluator_json('{"scorers": [{"name": "BAD NAME", "length": {}}]}')
    assert [v.field for v in err.value.violations] == [
        "scorers[0].name",
        "scorers[0].length.max_length",
    ]


def test_the_deploy_service_and_the_gateway_share_the_stop_limit_and_the_name_prefix() -> None:
    from services.deploy import core, domain
    from services.gateway import backend, calls

    assert domain.MAX_STOP is calls.MAX_STOP is sampling.MAX_STOP
    assert core.deployment_id(backend.deployment_name("chat")) == "chat"
