"""The trainer service's view of the registry at job creation: resolve the spec's inputs and
read a base model's config. gRPC errors become domain errors naming the spec field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from services.clients.errors import in_context
from services.clients.registry import RegistryClient
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TlmError,
    Unauthenticated,
    Unavailable,
)
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
    """Registry errors about `value` name `path`, the spec field that holds it; an outage is
    the registry's, and a refused service key is this deployment's to fix."""
    try:
        yield
    except (NotFound, InvalidArgument, FailedPrecondition, PermissionDenied) as exc:
        err = in_context(exc, f"{path}: {value}")
        err.violations = [FieldViolation(path, f"{value}: {exc.message}")]
        raise err from exc
    except (Unavailable, DeadlineExceeded) as exc:
        message = f"registry unavailable while resolving {path}: {exc.message}"
        raise Unavailable(message) from exc
    except Unauthenticated as exc:
        # Not the caller's doing: the trainer's own service key.
        raise FailedPrecondition(
            "the registry refused the trainer's service key (UNAUTHENTICATED) while resolving "
            f"{path}; check TLM_TRAINER_SERVICE_API_KEY and the registry's API keys"
        ) from exc


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
            is_adapter=revision.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER,
            parameter_count=revision.metadata.parameter_count,
            config={},
        )

    async def model_config(self, name: str, team: str) -> dict[str, Any]:
        """config.json of a revision, read from the start of its download and then abandoned,
        so an estimate never pulls the weights. {} when it is not among the first files."""
        stream = self.client.download_model_chunks(name, team)
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
        except TlmError:
            return {}
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        try:
            config = json.loads(data) if data else {}
        except ValueError:
            return {}
        return config if isinstance(config, dict) else {}

    async def dataset(self, path: str, name: str, team: str) -> tuple[str, DatasetKind, int]:
        """(resolved name, kind, row count)."""
        async with field_errors(path, name):
            revision = await self.client.get_dataset_revision(name, team)
        return revision.name, DatasetKind(revision.kind), revision.row_count

    async def evaluator(self, path: str, name: str, team: str) -> str:
        async with field_errors(path, name):
            revision = await self.client.get_evaluator_revision(name, team)
        return revision.name
