"""Page tokens and API-key resolution."""

from __future__ import annotations

import pytest

from services.common.auth import Authenticator
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.pagination import decode_token, encode_token, page_size


def test_page_token_round_trips_and_is_bound_to_its_query() -> None:
    token = encode_token({"after": "m-42"}, {"prefix": "m"})
    assert decode_token(token, {"prefix": "m"}) == {"after": "m-42"}
    assert decode_token("", {"prefix": "m"}) is None
    with pytest.raises(InvalidArgument, match="different filter"):
        decode_token(token, {"prefix": "x"})
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_token("not-a-token!", {})


def test_page_size_defaults_and_caps() -> None:
    assert (page_size(0), page_size(10), page_size(10**6)) == (50, 10, 1000)
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_keys_map_to_teams() -> None:
    auth = Authenticator({"k1": "a", "svc": "*"})
    assert auth.team_for("/tlm.x/Y", [("authorization", "Bearer k1")]) == "a"
    assert auth.team_for("/tlm.x/Y", [("x-api-key", "k1")]) == "a"
    assert auth.team_for("/tlm.x/Y", [("x-api-key", "svc"), ("x-tlm-team", "b")]) == "b"
    assert auth.team_for("/grpc.health.v1.Health/Check", []) is None
    for metadata in ([], [("authorization", "Bearer nope")], [("x-api-key", "svc")]):
        with pytest.raises(Unauthenticated):
            auth.team_for("/tlm.x/Y", metadata)


def test_insecure_dev_serves_the_dev_team() -> None:
    auth = Authenticator({}, insecure_dev=True)
    assert auth.team_for("/tlm.x/Y", []) == "dev"
    # Without keys nobody proves who they are, so nobody may pick a team: the header is ignored.
    assert auth.team_for("/tlm.x/Y", [("x-tlm-team", "victim")]) == "dev"
