"""Team names become folders, so they follow the resource-id rule wherever they enter (the
x-tlm-team header, the API key table), and keyless servers serve everyone as team "dev"."""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from services.common.auth import Authenticator
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.ids import team_dir
from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread
from tests.rpc_details import rpc_details
from tlm.registry.v1 import registry_pb2, registry_pb2_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

METHOD = "/tlm.x.v1.XService/Y"
BAD_TEAMS = ["../x", "/etc", "/tmp/x", "a/b", "..", "a..b", "Team-A", "-a", "a" * 64, "a b", "*"]


def _as_service(team: str) -> list[tuple[str, str]]:
    return [("x-api-key", "svc"), ("x-tlm-team", team)]


@pytest.mark.parametrize("team", BAD_TEAMS)
def test_a_service_key_cannot_act_for_a_team_that_is_no_name(team: str) -> None:
    auth = Authenticator({"svc": "*"})
    with pytest.raises(Unauthenticated, match=r"x-tlm-team: .* is not a valid team name"):
        auth.team_for(METHOD, _as_service(team))


def test_a_service_key_acts_for_a_valid_team() -> None:
    auth = Authenticator({"svc": "*"})
    for team in ("team-b", "a", "t.1_x", "0" * 63):
        assert auth.team_for(METHOD, _as_service(team)) == team


def test_a_bad_team_in_the_key_table_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"'\.\./x' is not valid"):
        ServerSettings(api_keys={"k": "../x"})
    ServerSettings(api_keys={"k": "team-a", "svc": "*"})  # the service team stays allowed
    # Built directly (no settings), the key still never yields a bad team.
    with pytest.raises(Unauthenticated, match="the API key table"):
        Authenticator({"k": "/abs"}).team_for(METHOD, [("x-api-key", "k")])


def test_keyless_mode_ignores_the_team_header() -> None:
    auth = Authenticator({}, insecure_dev=True)
    for team in ("victim", "../x", ""):
        assert auth.team_for(METHOD, [("x-tlm-team", team)]) == "dev"


@pytest.mark.parametrize("team", ["../x", "/abs", "a/b", "..", ""])
def test_team_dir_refuses_what_is_no_folder_name(tmp_path: Path, team: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid team name"):
        team_dir(tmp_path, team)
    assert team_dir(tmp_path, "team-a") == tmp_path / "team-a"


def test_a_bad_team_header_is_unauthenticated_on_a_real_server(
    secured: ServerThread, tmp_path: Path
) -> None:
    escape = tmp_path / "escape"
    with grpc.insecure_channel(secured.address) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        request = rollout_pb2.LoadModelRequest(model_revision="models/m/revisions/r1")
        for team in ("../escape", str(escape)):
            metadata = (("x-api-key", "key-service"), ("x-tlm-team", team))
            with pytest.raises(grpc.RpcError) as err:
                rollout.LoadModel(request, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "is not a valid team name" in (err.value.details() or "")
            assert _reason(err.value) == "INVALID_NAME"
    assert not escape.exists()


def test_keyless_servers_serve_every_caller_as_dev(embedded: ServerThread) -> None:
    """A header naming a team changes nothing: what 'victim' creates, the plain caller sees."""
    model_id = f"keyless-{secrets.token_hex(3)}"
    with grpc.insecure_channel(embedded.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        as_victim = (("x-tlm-team", "victim"),)
        registry.CreateModel(
            registry_pb2.CreateModelRequest(model_id=model_id), metadata=as_victim, timeout=10
        )
        got = registry.GetModel(registry_pb2.GetModelRequest(name=f"models/{model_id}"), timeout=10)
    assert got.name == f"models/{model_id}"


def _reason(err: grpc.RpcError) -> str:
    details = rpc_details(err)
    assert details.error_info is not None, "no ErrorInfo in details"
    return details.reason


def test_the_rollouts_startup_team_follows_the_rule() -> None:
    from services.rollout.settings import RolloutSettings

    assert RolloutSettings(startup_team="team-a").startup_team == "team-a"
    with pytest.raises(ValidationError, match="startup_team"):
        RolloutSettings(startup_team="../x")
