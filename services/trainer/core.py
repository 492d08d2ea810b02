"""The trainer's use cases (no grpc): create, get, list, cancel, watch and estimate jobs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

from services.common.errors import FailedPrecondition, FieldViolation
from services.common.pagination import decode_token, encode_token, page_size
from services.trainer.domain import (
    DatasetKindMismatch,
    Event,
    Job,
    JobState,
    Method,
    MethodNotImplemented,
    ModelIncompatible,
    Progress,
    RequestIdReused,
)
from services.trainer.methods import METHODS
from services.trainer.registry_port import RegistryPort
from services.trainer.resources import Devices, Estimate, estimate
from services.trainer.spec import JobSpec, validate
from services.trainer.store import JobStore, new_job_id, now
from services.trainer.supervisor import Key, Supervisor

log = structlog.get_logger("tlm.trainer")


@dataclass(frozen=True)
class CreateRequest:
    spec: JobSpec
    request_id: str = ""
    display_name: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    validate_only: bool = False


def _same_request(job: Job, digest: str) -> Job:
    """The job a request_id made, if this request is a retry of the one that made it."""
    if job.request_digest and job.request_digest != digest:  # "": stored before digests
        raise RequestIdReused(job.request_id, job.name)
    return job


class Changes:
    """Wakes watchers of a job when anything about it changes."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}

    def notify(self, key: Key) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def arm(self, key: Key) -> asyncio.Event:
        """An event set by the next notify(key); arm before reading, then wait on it."""
        return self._events.setdefault(key, asyncio.Event())


class TrainerCore:
    def __init__(
        self,
        store: JobStore,
        supervisor: Supervisor,
        changes: Changes,
        devices: Devices,
        registry: RegistryPort | None = None,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.changes = changes
        self.devices = devices
        self.registry = registry  # set once the server knows its address

    # Create --------------------------------------------------------------------------------

    async def create(self, team: str, request: CreateRequest) -> Job:
        # The request as sent (defaults filled, names not resolved): a retry repeats it even
        # after an alias has moved on.
        digest = validate(request.spec).digest()
        if request.request_id and not request.validate_only:
            existing = self.store.find_request(team, request.request_id)
            if existing is not None:
                return _same_request(existing, digest)
        spec = await self.check(team, request.spec)
        plan = (await self._estimate(team, spec)).plan  # the auto plan reads the memory estimate
        job = Job(
            job_id=new_job_id(),
            team=team,
            spec=spec.to_dict(),
            state=JobState.PENDING,
            device_plan=dataclasses.asdict(plan),
            progress=Progress(),
            create_time=now(),
            display_name=request.display_name,
            request_id=request.request_id,
            request_digest=digest,
            labels=dict(request.labels),
        )
        if request.validate_only:
            return job
        job, created = self.store.create(job)
        if not created:  # a concurrent create with the same request_id won
            return _same_request(job, digest)
        log.info("job_created", job=job.job_id, method=spec.method.name)
        self.supervisor.submit(team, job.job_id)
        return job

    async def check(self, team: str, spec: JobSpec) -> JobSpec:
        """Validate fields, then resolve every registry name (aliases become revisions) and
        check that each input suits the method."""
        spec = validate(spec)
        method = METHODS[spec.method]
        if not method.implemented:
            available = ", ".join(d.name for d in METHODS.values() if d.implemented)
            raise MethodNotImplemented(
                f"spec.method: {method.name} is not implemented yet; available: {available}",
                violations=[FieldViolation("spec.method", "method not implemented yet")],
            )
        assert self.registry is not None
        base = await self.registry.model("spec.base_model", spec.base_model, team)
        if base.is_adapter:
            raise ModelIncompatible(
                f"spec.base_model: {base.name} is a LoRA adapter; training needs full weights",
                violations=[FieldViolation("spec.base_model", "must be a full-weights revision")],
            )
        resolved: dict[str, Any] = {"base_model": base.name}
        for path in ("train_dataset", "eval_dataset"):
            name = getattr(spec, path)
            if name:
                resolved[path] = await self._dataset(team, spec.method, f"spec.{path}", name)
        if method.evaluator:
            if not spec.evaluator:
                raise FailedPrecondition(
                    f"spec.evaluator: {method.name} needs an evaluator {method.evaluator}, "
                    "e.g. evaluators/{e}/revisions/{revision}",
                    violations=[FieldViolation("spec.evaluator", "is required for this method")],
                )
            resolved["evaluator"] = await self.registry.evaluator(
                "spec.evaluator", spec.evaluator, team
            )
        critic = getattr(spec.params, "critic_model", "")
        if critic:  # PPO's critic starts from another full-weights model (a reward model)
            path = f"spec.{method.params_field}.critic_model"
            model = await self.registry.model(path, critic, team)
            if model.is_adapter:
                raise ModelIncompatible(
                    f"{path}: {model.name} is a LoRA adapter; the critic needs full weights",
                    violations=[FieldViolation(path, "must be a full-weights revision")],
                )
            resolved["params"] = dataclasses.replace(spec.params, critic_model=model.name)
        return dataclasses.replace(spec, **resolved)

    async def _dataset(self, team: str, method: Method, path: str, name: str) -> str:
        assert self.registry is not None
        resolved, kind, _rows = await self.registry.dataset(path, name, team)
        needed = METHODS[method]
        if kind != needed.dataset:
            dataset = resolved.split("/revisions/")[0]
            message = (
                f"{method.name} needs {needed.dataset_needs}; {dataset} is {kind.name.lower()}"
            )
            raise DatasetKindMismatch(
                message,
                violations=[FieldViolation(path, message)],
                metadata={"dataset": resolved, "needs": needed.dataset.name.lower()},
            )
        return resolved

    # Read ----------------------------------------------------------------------------------

    def get(self, team: str, job_id: str) -> Job:
        return self.store.get(team, job_id)

    def page(
        self, team: str, requested_size: int, token: str, state: int, method: int
    ) -> tuple[list[Job], str]:
        query = {"team": team, "state": state, "method": method}
        size = page_size(requested_size)
        before = decode_token(token, query)
        jobs, next_pk = self.store.page(team, size, before, state, method)
        return jobs, encode_token(next_pk, query) if next_pk is not None else ""

    # Cancel --------------------------------------------------------------------------------

    def cancel(self, team: str, job_id: str) -> Job:
        job = self.store.get(team, job_id)
        key = (team, job_id)
        if job.state.terminal:
            raise FailedPrecondition(
                f"{job.name} already ended ({job.state.name}); nothing to cancel",
                metadata={"state": job.state.name},
            )
        if job.state is JobState.CANCELLING:
            return job
        if job.state is JobState.PENDING and self.supervisor.withdraw(team, job_id):
            job = self.store.transition(
                team, job_id, JobState.CANCELLED, "cancelled before it started"
            )
        else:
            job = self.store.transition(
                team, job_id, JobState.CANCELLING, "cancel requested", cancel_requested=True
            )
            self.supervisor.cancel(team, job_id)
        self.changes.notify(key)
        log.info("job_cancel_requested", job=job_id, state=job.state.name)
        return job

    # Watch ---------------------------------------------------------------------------------

    async def watch(self, team: str, job_id: str, from_sequence: int) -> AsyncIterator[Event]:
        """Past events from `from_sequence`, then live ones until the job has ended."""
        key = (team, job_id)
        next_seq = max(from_sequence, 0)
        while True:
            changed = self.changes.arm(key)
            job = self.store.get(team, job_id)
            for event in self.store.events(team, job_id, next_seq):
                next_seq = event.sequence + 1
                yield event
            if job.state.terminal:
                # Events recorded between reading the job and its events came out above.
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=5.0)

    # Estimate ------------------------------------------------------------------------------

    async def estimate(self, team: str, spec: JobSpec) -> Estimate:
        return await self._estimate(team, await self.check(team, spec))

    async def _estimate(self, team: str, spec: JobSpec) -> Estimate:
        """Of a checked spec: the plan it runs with and its memory per device."""
        assert self.registry is not None
        base = await self.registry.model("spec.base_model", spec.base_model, team)
        config = await self.registry.model_config(base.name, team)
        return estimate(spec, base.parameter_count, config, self.devices)
