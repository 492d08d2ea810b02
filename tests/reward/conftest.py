"""Reward-service fixtures: a server with only the reward binding, and a blocking stub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from services.reward import app
from services.reward.settings import RewardSettings
from tlm.reward.v1 import reward_service_pb2_grpc


def start_reward(data_dir: Path, **overrides: object) -> ServerThread:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "insecure_dev": True,
        "data_dir": data_dir,
        "rule_workers": 0,
    }
    settings = RewardSettings.model_validate(values | overrides)
    return ServerThread(lambda: [app.binding(settings)], settings).start()


@pytest.fixture(scope="session")
def reward_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The reward service alone, rule scorers in a thread."""
    server = start_reward(tmp_path_factory.mktemp("reward"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reward(reward_server: ServerThread) -> Iterator[reward_service_pb2_grpc.RewardServiceStub]:
    with grpc.insecure_channel(reward_server.address) as channel:
        yield reward_service_pb2_grpc.RewardServiceStub(channel)
