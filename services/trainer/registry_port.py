"""The trainer service's view of the registry at job creation: resolve the spec's inputs and
read a base model's config. gRPC errors become domain errors naming the spec field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    TlmError,
    Unavailable,
)
from services.registry.client import CHUNK, RegistryClient
from services.trainer.domain import DatasetKind
from tlm.registry.v1 import registry_pb2

# Stop reading a download for config.json after this many bytes (weights come after it).
CONFIG_SCAN_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ModelInfo:
    name: str  # resolved revision name
    is_adapter: bool
    parameter_count: int
    config: dict[str, Any]  # config.json, {} when it could not be read cheaply


@asynccontextmanager
async def field_errors(path: str, value: str) -> AsyncIterator[None]:
    """Registry errors about `value` become NOT_FOUND / FAILED_PRECONDITION naming `path`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        violation = [FieldViolation(path, f"{value}: {exc.details()}")]
        cls: type[TlmError]
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            cls = NotFound if code == grpc.StatusCode.NOT_FOUND else InvalidArgument
            raise cls(f"{path}: {value}: {exc.details()}", violations=violation) from exc
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise FailedPrecondition(f"{path}: {exc.details()}", violations=violation) from exc
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            message = f"registry unavailable while resolving {path}: {exc.details()}"
            raise Unavailable(message) from exc
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # Not the caller's doing and not worth a retry: the trainer's service key.
            raise FailedPrecondition(
                f"the registry refused the trainer's service key ({code.name}) while resolving "
                f"{path}; check TLM_TRAINER_SERVICE_API_KEY and the registry's API keys"
            ) from exc
        raise  # anything else is unexpected: INTERNAL, logged with its traceback


class RegistryPort:
    def __init__(self, address: str, api_key: str | None) -> None:
        self.client = RegistryClient(address, api_key=api_key)

    async def close(self) -> None:
        await self.client.close()

    async def model(self, path: str, name: str, team: str) -> ModelInfo:
        async with field_errors(path, name):
            revision = await self.client.get_model_revision(name, team)
        return ModelInfo(
            name=revision.name,
            is_adapter=revision.format == registry_pb2.LORA_ADAPTER,
            parameter_count=revision.metadata.parameter_count,
            config={},
        )

    async def model_config(self, name: str, team: str) -> dict[str, Any]:
        """config.json of a revision, read from the start of its download and then abandoned,
        so an estimate never pulls the weights. {} when it is not among the first files."""
        request = registry_pb2.DownloadModelRevisionRequest(name=name, chunk_size=CHUNK)
        stream = self.client.stub.DownloadModelRevision(
            request, metadata=self.client.metadata(team)
        )
        data, seen = b"", 0
        try:
            async for message in stream:
                if message.HasField("manifest"):
                    continue
                chunk = message.chunk
                seen += len(chunk.data)
                if chunk.path == "config.json":
                    data += chunk.data
                elif data or seen > CONFIG_SCAN_LIMIT:
                    break
        except grpc.aio.AioRpcError:
            return {}
        finally:
            stream.cancel()
        try:
            config = json.loads(data) if data else {}
        except ValueError:
            return {}
        return config if isinstance(config, dict) else {}

    async def dataset(self, path: str, name: str, team: str) -> tuple[str, DatasetKind, int]:
        """(resolved name, kind, row count)."""
        async with field_errors(path, name):
            revision = await self.client.stub.GetDatasetRevision(
                registry_pb2.GetDatasetRevisionRequest(name=name),
                metadata=self.client.metadata(team),
            )
        return revision.name, DatasetKind(revision.kind), revision.row_count

    async def evaluator(self, path: str, name: str, team: str) -> str:
        async with field_errors(path, name):
            revision = await self.client.get_evaluator_revision(name, team)
        return revision.name
