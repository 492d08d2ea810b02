"""The reward service's view of the registry: the calls it makes through the registry client,
whose domain errors (services/clients/errors.py) reach the core naming what they are about."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.clients.artifacts import ModelCache
from services.clients.errors import in_context
from services.clients.registry import RegistryClient
from services.common.errors import TlmError
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import evaluator_pb2 as ev


@asynccontextmanager
async def mapped_errors(what: str) -> AsyncIterator[None]:
    """The registry client's domain errors, keeping their meaning, say which name they are
    about."""
    try:
        yield
    except TlmError as exc:
        if exc.remote is None:
            raise
        raise in_context(exc, f"registry: {what}") from exc


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
                parent, registry_pb2.DATASET_KIND_PREFERENCE, rows, request_id=request_id, team=team
            )
        return revision.name

    async def close(self) -> None:
        await self.client.close()
