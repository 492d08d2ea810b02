"""The clients retry UNAVAILABLE by gRPC's retry policy: a registry that restarts on the same
port within the backoff window is invisible to the caller; one that stays down is a clear
UNAVAILABLE naming the address, after the bounded attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.clients.registry import RegistryClient
from services.common.client import RetryPolicy
from services.common.errors import Unavailable
from tests.clients.conftest import registry
from tests.waiting import until
from tlm.registry.v1 import registry_pb2 as pb

# Retries after about 1, 2, 4 and 8 s (+-20%): the registry is back (a restart takes well under
# 0.8 s) before the first one.
PATIENT = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=8.0)


async def rows(client: RegistryClient) -> list[dict[str, Any]]:
    return [r async for r in client.read_dataset_rows("datasets/survivor/revisions/latest")]


async def model_name(client: RegistryClient) -> str:
    return str((await client.get("models", "models/survivor")).name)


# A unary call, and a server-streaming one (retried, like Generate, before its first response).
CALLS: dict[str, tuple[Callable[[RegistryClient], Coroutine[Any, Any, Any]], Any]] = {
    "unary": (model_name, "models/survivor"),
    "stream": (rows, [{"prompt": "p"}]),
}


@pytest.mark.parametrize("kind", list(CALLS))
async def test_a_call_outlives_a_registry_restart(kind: str, tmp_path: Path) -> None:
    first = registry(tmp_path)
    port = first.running.port  # type: ignore[union-attr]
    async with RegistryClient(first.address, retry=PATIENT) as setup:
        await setup.create_model("survivor")
        (tmp_path / "rows.jsonl").write_text('{"prompt": "p"}\n')
        await setup.upload_dataset_file(
            "datasets/survivor", tmp_path / "rows.jsonl", pb.DATASET_KIND_PROMPT
        )
    first.stop()

    client = RegistryClient(f"127.0.0.1:{port}", retry=PATIENT)
    fn, expected = CALLS[kind]
    try:
        call = asyncio.create_task(fn(client))
        # The first attempt has failed (nothing listens) before the registry comes back.
        await until(
            lambda: client._channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            what="the first attempt to fail",
        )
        assert not call.done()
        second = registry(tmp_path, port)
        try:
            assert await call == expected
        finally:
            second.stop()
    finally:
        await client.close()


async def test_it_gives_up_after_the_bound_naming_the_address(tmp_path: Path) -> None:
    server = registry(tmp_path)
    address = server.address
    server.stop()
    quick = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with RegistryClient(address, retry=quick) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await client.get("models", "models/anything")
    assert (
        err.value.message == f"cannot reach the registry service at {address} (connection refused)"
    )
    assert err.value.remote is not None and err.value.remote.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5


async def test_no_retry_when_the_policy_says_one_attempt(tmp_path: Path) -> None:
    """The restart test's counterpart: without retries the same call fails at once."""
    server = registry(tmp_path)
    address = server.address
    server.stop()
    async with RegistryClient(address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(Unavailable):
            await client.get("models", "models/anything")
