"""The hand-checked examples in the scorers' docstrings run as tests."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from services.reward import (
    aggregate,
    judge,
    model_scorer,
    remote,
    reviews,
    rules,
    sandbox,
    spec_json,
    text,
)

MODULES = [aggregate, judge, model_scorer, remote, reviews, rules, sandbox, spec_json, text]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module: ModuleType) -> None:
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0, "module has no examples"
    assert result.failed == 0
