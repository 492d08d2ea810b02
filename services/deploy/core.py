"""The deploy core: deployments' use cases (no grpc). Each change that names another revision
starts a *roll* in the background: warm the revision on the serving pool, then make it serve and
keep the one it replaces as the rollback target (domain.py). The store's generation check makes a
roll that finishes after a newer change drop its outcome; the newer change has its own roll."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Protocol

import structlog

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    TlmError,
    field_error,
)
from services.common.ids import ID_RULE, is_valid_id
from services.common.pagination import decode_token, encode_token, page_size
from services.deploy.domain import (
    Deployment,
    DeploymentNotFound,
    DeploymentState,
    NoRollbackTarget,
    Page,
    Resolved,
    Spec,
    check_mask,
)
from services.deploy.store import DeploymentStore
from services.specs.names import DEPLOYMENT_PREFIX

log = structlog.get_logger("tlm.deploy")
# Update mask paths -> Spec fields.
SPEC_FIELDS = {
    "model": "model",
    "adapter": "adapter",
    "replicas": "replicas",
    "sampling_defaults": "sampling",
    "description": "description",
}


class Resolver(Protocol):
    async def resolve(self, spec: Spec, team: str) -> Resolved: ...

    async def close(self) -> None: ...


class Pool(Protocol):
    async def warm(self, target: Resolved, replicas: int, team: str) -> None: ...

    async def close(self) -> None: ...


def deployment_id(name: str, field: str = "name") -> str:
    """'deployments/{id}' -> id, checked."""
    value = name.removeprefix(DEPLOYMENT_PREFIX)
    if not name.startswith(DEPLOYMENT_PREFIX) or not is_valid_id(value):
        raise field_error(
            field, f"{name!r} is not valid: expected '{DEPLOYMENT_PREFIX}{{id}}', id {ID_RULE}"
        )
    return value


class DeployCore:
    def __init__(self, store: DeploymentStore, resolver: Resolver, pool: Pool) -> None:
        self.store = store
        self.resolver = resolver
        self.pool = pool
        self._rolls: set[asyncio.Task[None]] = set()

    # Standard methods ------------------------------------------------------------------------

    async def create(self, team: str, dep_id: str, spec: Spec, request_id: str) -> Deployment:
        if not is_valid_id(dep_id):
            raise field_error("deployment_id", f"{dep_id!r} is not valid: expected {ID_RULE}")
        spec.check()
        if request_id:
            existing = await asyncio.to_thread(self.store.find_request, team, request_id)
            if existing is not None:
                return self._same_request(existing, dep_id, spec)
        target = await self.resolver.resolve(spec, team)
        new = Deployment(dep_id, team, spec, request_id=request_id).rolling_to(target)
        saved, created = await asyncio.to_thread(self.store.create, new)
        if not created:
            return self._same_request(saved, dep_id, spec)
        log.info("deployment_created", deployment=saved.name, model=target.model)
        self._start_roll(saved)
        return saved

    @staticmethod
    def _same_request(existing: Deployment, dep_id: str, spec: Spec) -> Deployment:
        if existing.deployment_id != dep_id or existing.spec != spec:
            raise AlreadyExists(
                f"request_id was used for {existing.name} with another deployment",
                violations=[FieldViolation("request_id", "already used for another deployment")],
            )
        return existing

    async def get(self, team: str, name: str) -> Deployment:
        return await asyncio.to_thread(self.store.get, team, deployment_id(name))

    async def list_page(self, team: str, size: int, token: str) -> Page:
        limit = page_size(size)
        after = decode_token(token, team) or ""
        found = await asyncio.to_thread(self.store.list_after, team, after, limit + 1)
        more = len(found) > limit
        found = found[:limit]
        next_token = encode_token(found[-1].deployment_id, team) if more else ""
        return Page(found, next_token)

    async def update(
        self, team: str, name: str, changes: Spec, mask: list[str], etag: str
    ) -> Deployment:
        paths = check_mask(mask)
        current = await self.get(team, name)
        if etag and etag != current.etag:
            raise Aborted(
                f"{current.name}: etag {etag} is stale (now {current.etag}); read it again"
            )
        spec = replace(
            current.spec, **{SPEC_FIELDS[p]: getattr(changes, SPEC_FIELDS[p]) for p in paths}
        )
        spec.check()
        updated = replace(current, spec=spec)
        rolls = False
        if {"model", "adapter"} & set(paths):
            target = await self.resolver.resolve(spec, team)
            rolls = target != current.current or current.state != DeploymentState.READY
            updated = updated.rolling_to(target) if rolls else replace(updated, pending=None)
        saved = await asyncio.to_thread(self.store.save, updated)
        log.info("deployment_updated", deployment=saved.name, fields=paths, rolls=rolls)
        if rolls:
            self._start_roll(saved)
        return saved

    async def delete(self, team: str, name: str) -> None:
        await asyncio.to_thread(self.store.delete, team, deployment_id(name))
        log.info("deployment_deleted", deployment=name)

    # Custom methods --------------------------------------------------------------------------

    async def rollback(self, team: str, name: str) -> Deployment:
        current = await self.get(team, name)
        target = current.previous
        if target is None:
            raise NoRollbackTarget(
                f"{current.name} has no previous revision to roll back to",
                metadata={"resource": current.name},
            )
        # Pinned to the revision itself: a later move of the alias must not undo the rollback.
        spec = replace(current.spec, model=target.model, adapter=target.adapter)
        saved = await asyncio.to_thread(
            self.store.save, replace(current, spec=spec).rolling_to(target)
        )
        log.info("deployment_rollback", deployment=saved.name, to=target.model)
        self._start_roll(saved)
        return saved

    async def refresh(self, team: str, name: str) -> tuple[Deployment, bool]:
        """Re-resolve the aliases; roll when they moved. (deployment, rolled)."""
        return await self._refresh(await self.get(team, name))

    async def _refresh(self, current: Deployment) -> tuple[Deployment, bool]:
        target = await self.resolver.resolve(current.spec, current.team)
        if target == current.target():
            return current, False
        saved = await asyncio.to_thread(self.store.save, current.rolling_to(target))
        log.info("deployment_alias_moved", deployment=saved.name, to=target.model)
        self._start_roll(saved)
        return saved, True

    async def refresh_all(self) -> None:
        """Refresh every team's deployments; one that fails to resolve is logged and skipped."""
        for d in await asyncio.to_thread(self.store.every):
            try:
                await self._refresh(d)
            except TlmError as exc:
                log.warning("deployment_refresh_failed", deployment=d.name, error=exc.message)

    # Rolls -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Restart the rolls of PENDING deployments (a deploy replica stopped mid-roll)."""
        for d in self.store.every():
            if d.state == DeploymentState.PENDING and d.pending is not None:
                self._start_roll(d)

    def _start_roll(self, d: Deployment) -> None:
        task = asyncio.get_running_loop().create_task(self._roll(d))
        self._rolls.add(task)
        task.add_done_callback(self._rolls.discard)

    async def _roll(self, d: Deployment) -> None:
        assert d.pending is not None
        try:
            await self.pool.warm(d.pending, d.spec.replicas, d.team)
            outcome = d.rolled()
        except TlmError as exc:
            outcome = d.failed(
                f"warming {d.pending.model} on the serving pool failed: {exc.message}"
            )
        except Exception:
            log.exception("deployment_warm_up_crashed", deployment=d.name)
            outcome = d.failed(f"warming {d.pending.model} failed with an internal error")
        try:
            saved = await asyncio.to_thread(self.store.save, outcome)
        except (Aborted, DeploymentNotFound):
            return  # changed or deleted meanwhile: the newer change decides
        log.info("deployment_rolled", deployment=saved.name, state=saved.state.name)

    async def close(self) -> None:
        for task in list(self._rolls):
            task.cancel()
        await asyncio.gather(*self._rolls, return_exceptions=True)
