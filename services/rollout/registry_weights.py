"""Weights from the registry: resolve a revision, download it once into a local cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.clients.artifacts import ModelCache, manifest_digest
from services.clients.registry import RegistryClient
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.rollout.weights import ResolvedRevision, RevisionNotFound, WeightFormat
from tlm.registry.v1 import registry_pb2

FORMATS = {
    registry_pb2.MODEL_FORMAT_FULL_WEIGHTS: WeightFormat.FULL,
    registry_pb2.MODEL_FORMAT_LORA_ADAPTER: WeightFormat.LORA,
}
# Registry answers that mean "that name is no revision you can use", not an outage.
NOT_FOUND = (NotFound, InvalidArgument)


class RegistryWeights:
    """A WeightSource over RegistryClient + ModelCache; calls act for the caller's team."""

    def __init__(self, address: str, api_key: str | None, cache_root: Path) -> None:
        self.client = RegistryClient(address, api_key=api_key)
        self.cache = ModelCache(self.client, cache_root)

    async def resolve(self, name: str, team: str) -> str:
        with _registry_errors(name):
            revision = await self.client.get_model_revision(name, team)
        return revision.name

    async def fetch(self, name: str, team: str) -> ResolvedRevision:
        with _registry_errors(name):
            revision, folder = await self.cache.get(name, team)
        if revision.format not in FORMATS:
            raise InvalidArgument(f"{revision.name} has no usable format")
        return ResolvedRevision(
            name=revision.name,
            format=FORMATS[revision.format],
            path=folder,
            base_model_revision=revision.lineage.base_model_revision,
            digest=manifest_digest(revision.manifest),
        )

    async def close(self) -> None:
        await self.client.close()


@contextmanager
def _registry_errors(name: str) -> Iterator[None]:
    """The registry's answers about `name`, as the rollout reports them (the client kept their
    meaning; PERMISSION_DENIED stays that)."""
    try:
        yield
    except NOT_FOUND as exc:
        if exc.remote is None:
            raise
        raise RevisionNotFound(f"{name}: {exc.message or 'not found in the registry'}") from exc
    except (Unavailable, DeadlineExceeded) as exc:
        raise Unavailable(f"the registry did not answer for {name}: {exc.message}") from exc
