"""The reward service's view of the registry: the calls it makes, with gRPC errors turned into
domain errors so the core never sees a grpc exception."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TlmError,
    Unavailable,
)
from services.registry.client import ModelCache, RegistryClient
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import evaluator_pb2 as ev

CODES: Mapping[grpc.StatusCode, type[TlmError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: NotFound,
}


@asynccontextmanager
async def mapped_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        cls = CODES.get(exc.code(), Unavailable)
        raise cls(f"registry: {what}: {exc.details()}") from exc


class RegistryPort:
    def __init__(self, address: str, api_key: str | None, cache_root: Path) -> None:
        self.client = RegistryClient(address, api_key=api_key)
        self.models = ModelCache(self.client, cache_root)

    async def evaluator_spec(self, name: str, team: str) -> tuple[ev.EvaluatorSpec, str]:
        async with mapped_errors(name):
            revision = await self.client.get_evaluator_revision(name, team)
        return revision.spec, revision.name

    async def model_folder(self, name: str, team: str) -> tuple[registry_pb2.ModelRevision, Path]:
        async with mapped_errors(name):
            return await self.models.get(name, team)

    async def append_preferences(
        self, dataset: str, rows: Iterable[Mapping[str, Any]], request_id: str, team: str
    ) -> str:
        parent = dataset if dataset.startswith("datasets/") else f"datasets/{dataset}"
        async with mapped_errors(parent):
            revision = await self.client.append_dataset_rows(
                parent, registry_pb2.PREFERENCE, rows, request_id=request_id, team=team
            )
        return revision.name

    async def close(self) -> None:
        await self.client.close()
