"""Collection rules for the whole tree (tests/ and the doctests of services/).

Two kinds of module are not imported just to be collected, since importing is much of the fast
lane's cost (transformers, TRL, PEFT and datasets take seconds):
- a module that is not a test module (services/, helpers under tests/) without a `>>>`
  example: `--doctest-modules` would import it and find no doctest;
- under `-m 'not slow'` (`make test-fast`), a test module marked slow as a whole
  (`pytestmark = pytest.mark.slow`): every test in it would be deselected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SLOW_MODULE = "\npytestmark = pytest.mark.slow\n"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    name = collection_path.name
    if collection_path.suffix != ".py" or name in ("conftest.py", "__init__.py"):
        return None
    if not name.startswith("test_"):
        return ">>>" not in collection_path.read_text() or None
    if config.getoption("markexpr", "").strip() == "not slow":
        return SLOW_MODULE in collection_path.read_text() or None
    return None
