"""Wiring of the trainer service: store + supervisor + core behind the thin servicer."""

from __future__ import annotations

import fcntl
import os
from dataclasses import replace
from pathlib import Path
from typing import IO

from services.common.server import ServiceBinding
from services.trainer.core import Changes, TrainerCore
from services.trainer.launchers import Launcher
from services.trainer.registry_port import RegistryPort
from services.trainer.resources import detect_devices
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from services.trainer.supervisor import DEFAULT_WORKER, Supervisor, WorkerConfig, local_launcher
from tlm.trainer.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def binding(
    settings: TrainerSettings, worker_module: str = DEFAULT_WORKER, cancel_grace_s: float = 30.0
) -> ServiceBinding:
    """`worker_module` is the worker entry point (tests swap in one that crashes); a cancelled
    worker that has not exited after `cancel_grace_s` is killed."""
    work_dir = settings.data_dir / "trainer"
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = owner_lock(work_dir)
    store = JobStore(f"sqlite:///{work_dir / 'jobs.db'}")
    changes = Changes()
    holder: dict[str, Supervisor] = {}
    devices = replace(detect_devices(), nodes=settings.max_nodes())  # >1: on Kubernetes
    core = TrainerCore(store, None, changes, devices)  # type: ignore[arg-type]
    servicer = TrainerServicer(core)

    async def on_start(address: str) -> None:
        # Unset addresses mean the server's own (`tlm up` runs every service in one process).
        config = WorkerConfig(
            root=work_dir / "jobs",
            max_running=settings.max_running_jobs,
            module=worker_module,
            cancel_grace_s=cancel_grace_s,
            torch_threads=max(1, (os.cpu_count() or 1) // settings.max_running_jobs),
            api_key=settings.service_api_key,
            registry_address=settings.registry_address or address,
            rollout_address=settings.rollout_address or address,
            reward_address=settings.reward_address or address,
            outage_timeout_s=settings.outage_timeout_s,
            max_restarts=settings.max_restarts,
        )
        core.registry = RegistryPort(config.registry_address, settings.service_api_key)
        launcher: Launcher = local_launcher(config)
        if settings.kubernetes_jobs != "off":  # the client is the `kubernetes` extra's
            from services.trainer.kubernetes_jobs import with_kubernetes

            launcher = with_kubernetes(settings, launcher, config.root, worker_module)
        supervisor = Supervisor(store, config, changes.notify, launcher)
        core.supervisor = holder["supervisor"] = supervisor
        holder["supervisor"].recover()

    async def on_stop() -> None:
        if "supervisor" in holder:
            await holder["supervisor"].stop()
        if core.registry is not None:
            await core.registry.close()
        store.close()
        lock.close()

    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            servicer, server
        ),
        on_start=on_start,
        on_stop=on_stop,
    )


def owner_lock(work_dir: Path) -> IO[bytes]:
    """One trainer owns a data directory's jobs (it runs and recovers them): an exclusive
    lock on `trainer/LOCK`, held while the returned file is open."""
    path = work_dir / "LOCK"
    lock = path.open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(
            f"another trainer is using {work_dir} (it holds {path}); "
            "give each trainer its own TLM_TRAINER_DATA_DIR"
        ) from None
    return lock
