"""Shared fixtures: real servers on loopback port 0, tiny models built offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread

configure_logging(json=True, level="info")

API_KEYS = {"key-team-a": "team-a", "key-team-b": "team-b", "key-service": "*"}


def start_embedded(data_dir: Path, **settings: object) -> ServerThread:
    from services.embedded import SERVICE_ORDER, bindings_for

    shared = ServerSettings(host="127.0.0.1", port=0, data_dir=data_dir, **settings)  # type: ignore[arg-type]
    return ServerThread(lambda: bindings_for(SERVICE_ORDER, shared), shared).start()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """All four services in one server, as `tlm up` runs them, without API keys."""
    server = start_embedded(tmp_path_factory.mktemp("embedded"), insecure_dev=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """All four services with API keys for two teams and a service key."""
    server = start_embedded(tmp_path_factory.mktemp("secured"), api_keys=API_KEYS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from services.devtools.tiny_models import cached_tiny_model

    return cached_tiny_model("test", "causal-lm")


@pytest.fixture(scope="session")
def tiny_reward_model_dir() -> Path:
    from services.devtools.tiny_models import cached_tiny_model

    return cached_tiny_model("test", "reward-model")
