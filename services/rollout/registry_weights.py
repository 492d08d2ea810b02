"""Weights from the registry: resolve a revision, download it once into a local cache."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common.errors import InvalidArgument, Unavailable
from services.registry.client import ModelCache, RegistryClient, manifest_digest
from services.rollout.weights import ResolvedRevision, RevisionNotFound, WeightFormat
from tlm.registry.v1 import registry_pb2

FORMATS = {
    registry_pb2.FULL_WEIGHTS: WeightFormat.FULL,
    registry_pb2.LORA_ADAPTER: WeightFormat.LORA,
}
# Registry answers that mean "that name is no revision you can use", not an outage.
NOT_FOUND_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
}


class RegistryWeights:
    """A WeightSource over RegistryClient + ModelCache; calls act for the caller's team."""

    def __init__(self, address: str, api_key: str | None, cache_root: Path) -> None:
        self.client = RegistryClient(address, api_key=api_key)
        self.cache = ModelCache(self.client, cache_root)

    async def resolve(self, name: str, team: str) -> str:
        try:
            revision = await self.client.get_model_revision(name, team)
        except grpc.RpcError as exc:
            raise _translate(exc, name) from exc
        return revision.name

    async def fetch(self, name: str, team: str) -> ResolvedRevision:
        try:
            revision, folder = await self.cache.get(name, team)
        except grpc.RpcError as exc:
            raise _translate(exc, name) from exc
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


def _translate(exc: grpc.RpcError, name: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else ""
    if code in NOT_FOUND_CODES:
        return RevisionNotFound(f"{name}: {details or 'not found in the registry'}")
    return Unavailable(f"the registry did not answer for {name}: {details or code}")
