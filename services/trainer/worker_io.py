"""A worker's registry I/O: base model download (cached), dataset rows, result upload."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.registry.client import ModelCache, RegistryClient
from services.trainer.spec import JobSpec
from services.trainer.worker_protocol import API_KEY_ENV, EventWriter, WorkerJob
from tlm.registry.v1 import registry_pb2


class Cancelled(Exception):
    """The service asked this worker to stop (SIGTERM)."""


@dataclass
class WorkerContext:
    """Everything a method runner needs."""

    job: WorkerJob
    spec: JobSpec
    folder: Path
    events: EventWriter
    stop: threading.Event
    registry: RegistryClient

    @property
    def team(self) -> str:
        return self.job.team

    @property
    def api_key(self) -> str | None:
        return os.environ.get(API_KEY_ENV) or None

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled()

    def log(self, message: str, level: str = "info") -> None:
        self.events.emit("log", level=level, message=message)

    async def base_model(self) -> Path:
        cache = Path(self.job.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        _revision, folder = await ModelCache(self.registry, cache).get(
            self.spec.base_model, self.team
        )
        return folder

    async def rows(self, name: str, limit: int = 0) -> list[dict[str, Any]]:
        options: dict[str, Any] = {"limit": limit} if limit else {}
        return [row async for row in self.registry.read_dataset_rows(name, self.team, **options)]

    async def upload(self, folder: Path, adapter: bool, request_id: str = "") -> str:
        """Push `folder` as a new revision of the output model (created if missing); the
        request id (default: the job's output) makes a retried upload store one revision."""
        spec = self.spec
        model_id = spec.output_model.removeprefix("models/")
        try:
            await self.registry.stub.CreateModel(
                registry_pb2.CreateModelRequest(
                    model_id=model_id, description=f"trained by {self.job.name}"
                ),
                metadata=self.registry.metadata(self.team),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        lineage = registry_pb2.Lineage(
            base_model_revision=spec.base_model,
            dataset_revisions=[d for d in (spec.train_dataset, spec.eval_dataset) if d],
            training_job=self.job.name,
            evaluator_revision=spec.evaluator,
        )
        revision = await self.registry.upload_model_revision(
            spec.output_model,
            folder,
            format=registry_pb2.LORA_ADAPTER if adapter else registry_pb2.FULL_WEIGHTS,
            lineage=lineage,
            request_id=request_id or f"{self.job.name.removeprefix('jobs/')}-output",
            description=f"{spec.method.name} by {self.job.name}",
            team=self.team,
        )
        return revision.name
