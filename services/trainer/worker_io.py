"""A worker's registry I/O: base model download (cached), dataset rows, result upload."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.clients.artifacts import ModelCache
from services.clients.registry import RegistryClient
from services.common.errors import DeadlineExceeded, Unavailable, field_error
from services.trainer.spec import ALL_LINEAR, JobSpec
from services.trainer.worker_protocol import API_KEY_ENV, EventWriter, WorkerJob
from tlm.registry.v1 import registry_pb2

# Upload attempts and the wait before each retry (seconds): the registry restarting, a
# dropped connection. Request ids are derived from the job, so a retry stores one revision.
UPLOAD_BACKOFF_S = (1.0, 4.0, 15.0)
RETRYABLE = (Unavailable, DeadlineExceeded)


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
        return await self.model(self.spec.base_model)

    async def model(self, name: str) -> Path:
        """The folder of model revision `name`, fetched into the job's cache."""
        cache = Path(self.job.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        _revision, folder = await ModelCache(self.registry, cache).get(name, self.team)
        return folder

    async def rows(self, name: str, limit: int = 0) -> list[dict[str, Any]]:
        options: dict[str, Any] = {"limit": limit} if limit else {}
        return [row async for row in self.registry.read_dataset_rows(name, self.team, **options)]

    async def upload(self, folder: Path, adapter: bool, request_id: str = "") -> str:
        """Push `folder` as a new revision of the output model (created if missing); the
        request id (default: the job's output) makes a retried upload store one revision, so
        UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff."""
        return await retrying(lambda: self._upload(folder, adapter, request_id), self.log)

    async def _upload(self, folder: Path, adapter: bool, request_id: str) -> str:
        spec = self.spec
        model_id = spec.output_model.removeprefix("models/")
        await self.registry.create_model(
            model_id, f"trained by {self.job.name}", self.team, exist_ok=True
        )
        lineage = registry_pb2.Lineage(
            base_model_revision=spec.base_model,
            dataset_revisions=[d for d in (spec.train_dataset, spec.eval_dataset) if d],
            training_job=self.job.name,
            evaluator_revision=spec.evaluator,
        )
        revision = await self.registry.upload_model_revision(
            spec.output_model,
            folder,
            format=registry_pb2.MODEL_FORMAT_LORA_ADAPTER
            if adapter
            else registry_pb2.MODEL_FORMAT_FULL_WEIGHTS,
            lineage=lineage,
            request_id=request_id or f"{self.job.name.removeprefix('jobs/')}-output",
            description=f"{spec.method.name} by {self.job.name}",
            team=self.team,
        )
        return revision.name


async def retrying(
    call: Callable[[], Awaitable[str]],
    log: Callable[[str, str], None],
    backoff_s: tuple[float, ...] | None = None,
) -> str:
    """`call()`, again after each wait of `backoff_s` while it fails with an outage
    (UNAVAILABLE, DEADLINE_EXCEEDED) that the client's own quick retries did not outlast."""
    waits = list(UPLOAD_BACKOFF_S if backoff_s is None else backoff_s)
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            if not waits:
                raise
            wait = waits.pop(0)
            code = exc.remote.code.name if exc.remote else type(exc).__name__
            log(f"registry {code} during upload; retrying in {wait:g} s", "warning")
            await asyncio.sleep(wait)


def check_lora_targets(spec: JobSpec, model: Any) -> None:
    """Each named LoRA target must match a module of the base (peft matches a full name or
    its last components); a typo is the user's INVALID_ARGUMENT, not an internal error."""
    if spec.lora is None or ALL_LINEAR in spec.lora.target_modules:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [
        t for t in spec.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)
    ]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if "." in n})
        raise field_error(
            "spec.tuning.lora.target_modules",
            f"{', '.join(missing)} not found in the base model; its modules include "
            f"{', '.join(suffixes[:20])}",
        )
