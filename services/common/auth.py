"""API keys -> teams. Every handler reads the caller's team from `current_team()`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from services.common.errors import Unauthenticated
from services.common.ids import check_team

# Keyless (insecure_dev) servers serve every caller as this team and read no team header:
# without keys nobody proves who they are, so nobody may pick a team.
DEV_TEAM = "dev"
# A key mapped to this team is a trusted service key: it may act for the team named in
# TEAM_HEADER (how the trainer calls the registry on a job's behalf).
SERVICE_TEAM = "*"
TEAM_HEADER = "x-tlm-team"
# Health checks and reflection stay open so probes and generic tools work without keys.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_team: ContextVar[str | None] = ContextVar("tlm_team", default=None)


def current_team() -> str:
    team = _team.get()
    if team is None:
        raise Unauthenticated("no team bound to this call")
    return team


def bind_team(team: str | None) -> object:
    return _team.set(team)


@dataclass(frozen=True)
class Authenticator:
    """Maps request metadata to a team, or raises Unauthenticated. Teams become folders, so
    every team it returns follows the id rule (`services.common.ids`)."""

    api_keys: Mapping[str, str]
    insecure_dev: bool = False

    def team_for(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        if method.startswith(OPEN_PREFIXES):
            return None
        # Binary ("-bin") headers such as tracing contexts are not ours to read.
        headers = {k.lower(): v for k, v in metadata if isinstance(v, str)}
        key = _api_key(headers)
        if not self.api_keys and self.insecure_dev:
            return DEV_TEAM
        if key is None:
            raise Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>' or 'x-api-key'"
            )
        team = self.api_keys.get(key)
        if team is None:
            raise Unauthenticated("unknown API key")
        if team == SERVICE_TEAM:
            acting = headers.get(TEAM_HEADER)
            if not acting:
                raise Unauthenticated(f"service keys must name a team in '{TEAM_HEADER}'")
            return check_team(acting, TEAM_HEADER, Unauthenticated)
        return check_team(team, "the API key table", Unauthenticated)


def _api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None
