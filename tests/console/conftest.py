"""The console on a real gateway in front of the embedded services (API keys on), with the tiny
model pushed and one pairwise review waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import json_format

from services.clients import RegistryClient, RewardClient
from services.devtools.gateway_thread import GatewayThread
from services.devtools.server_thread import ServerThread
from services.gateway.settings import GatewaySettings
from tests.conftest import API_KEYS, start_embedded
from tlm.reward.v1 import reward_service_pb2 as rs

KEY = "key-team-a"
PAIRWISE = {
    "scorers": [
        {
            "name": "people",
            "human": {
                "kind": "REVIEW_KIND_PAIRWISE",
                "dataset": "console-prefs",
                "instructions": "Which answer is better?",
            },
        }
    ]
}


@dataclass
class Stack:
    server: ServerThread
    gateway: GatewayThread

    @property
    def console(self) -> str:
        return f"{self.gateway.url}/console"


async def _seed(address: str, model_dir: Path) -> None:
    async with RegistryClient(address, api_key=KEY) as registry:
        await registry.create_model("tiny", exist_ok=True)
        await registry.upload_model_revision("models/tiny", model_dir)
    async with RewardClient(address, api_key=KEY) as reward:
        request = rs.ScoreRequest(samples=[_sample("a", "4"), _sample("b", "five")])
        json_format.ParseDict(PAIRWISE, request.spec)
        await reward.score(request)


def _sample(sample_id: str, completion: str) -> rs.Sample:
    s = rs.Sample(sample_id=sample_id, completion=completion, group_id="g")
    s.prompt.text = "What is 2 + 2?"
    return s


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    server = start_embedded(tmp_path_factory.mktemp("console"), api_keys=API_KEYS)
    settings = GatewaySettings(host="127.0.0.1", port=0, api_keys=API_KEYS)
    gateway = GatewayThread(settings, server.address).start()
    asyncio.run(_seed(server.address, tiny_model_dir))
    yield Stack(server, gateway)
    gateway.stop()
    server.stop()
