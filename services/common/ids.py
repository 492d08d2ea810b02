"""The one rule for names that may become a path: resource ids and team names.

Teams arrive in metadata (`x-tlm-team`) and in the API key table, and services turn them into
folders (model caches, job folders). The rule makes that safe: short, lowercase, never a
separator, never "..". Every folder named after a team comes from `team_dir`, which checks the
rule again, so no path depends on every caller having validated first.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.common.errors import InvalidArgument, TlmError
from tlm.common.v1 import common_pb2

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ID_RULE = "1-63 of [a-z0-9._-], starting with a letter or digit, no '..'"


def is_valid_id(value: str) -> bool:
    return bool(ID_PATTERN.fullmatch(value)) and ".." not in value


def check_team(team: str, source: str, error: type[TlmError] = InvalidArgument) -> str:
    """`team` if it follows the rule, else `error` naming `source` (a header, a setting)."""
    if not is_valid_id(team):
        message = f"{source}: {team!r} is not a valid team name: expected {ID_RULE}"
        raise error(message, metadata={"source": source}, reason=common_pb2.INVALID_NAME)
    return team


def team_dir(root: Path, team: str) -> Path:
    """`root / team`: the only way a team becomes a path."""
    return root / check_team(team, "team")
