"""Wiring of the deploy service: store + registry resolver + serving pool + core, behind the
thin servicer, and the periodic alias refresh."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from services.clients.registry import RegistryClient
from services.clients.rollout import RolloutClient
from services.common.server import ServiceBinding
from services.deploy.core import DeployCore
from services.deploy.ports import RegistryResolver, ServingPool
from services.deploy.servicer import DeploymentServicer
from services.deploy.settings import DeploySettings
from services.deploy.store import DeploymentStore
from tlm.deploy.v1 import deploy_pb2, deploy_pb2_grpc

SERVICE_NAME = deploy_pb2.DESCRIPTOR.services_by_name["DeploymentService"].full_name
log = structlog.get_logger("tlm.deploy")


def binding(settings: DeploySettings) -> ServiceBinding:
    work_dir = settings.data_dir / "deploy"
    work_dir.mkdir(parents=True, exist_ok=True)
    store = DeploymentStore(settings.database_url or f"sqlite:///{work_dir / 'deployments.db'}")
    holder: dict[str, DeployCore] = {}
    tasks: list[asyncio.Task[None]] = []
    servicer = DeploymentServicer(lambda: holder["core"], settings.pool)

    async def on_start(address: str) -> None:
        # Unset addresses mean the server's own (`tlm up` runs every service in one process).
        key = settings.service_api_key
        registry = RegistryClient(settings.registry_address or address, api_key=key)
        rollout = RolloutClient(settings.rollout_address or address, api_key=key)
        core = holder["core"] = DeployCore(
            store, RegistryResolver(registry), ServingPool(rollout, settings.warmup_timeout_s)
        )
        core.recover()
        if settings.refresh_interval_s > 0:
            tasks.append(asyncio.create_task(_refresh_every(core, settings.refresh_interval_s)))

    async def on_stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        core = holder.get("core")
        if core is not None:
            await core.close()
            await core.resolver.close()
            await core.pool.close()
        store.close()

    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: deploy_pb2_grpc.add_DeploymentServiceServicer_to_server(
            servicer, server
        ),
        on_start=on_start,
        on_stop=on_stop,
    )


async def _refresh_every(core: DeployCore, interval_s: float) -> None:
    """Follow moved aliases: a timer, not an ordering of events, so a sleep is right here."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await core.refresh_all()
        except Exception:  # the loop must outlive one bad pass (a database outage, say)
            log.exception("deployment_refresh_pass_failed")
