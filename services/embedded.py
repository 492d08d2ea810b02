"""`tlm up` and `tlm serve`: which services run in a process and with what settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from services.common.auth import SERVICE_TEAM
from services.common.server import ServiceBinding
from services.common.settings import ServerSettings
from services.deploy import app as deploy_app
from services.deploy.settings import DeploySettings
from services.registry import app as registry_app
from services.registry.settings import RegistrySettings
from services.reward import app as reward_app
from services.reward.settings import RewardSettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from services.trainer import app as trainer_app
from services.trainer.settings import TrainerSettings

SERVICES: dict[str, tuple[ModuleType, type[ServerSettings]]] = {
    "registry": (registry_app, RegistrySettings),
    "reward": (reward_app, RewardSettings),
    "rollout": (rollout_app, RolloutSettings),
    "trainer": (trainer_app, TrainerSettings),
    "deploy": (deploy_app, DeploySettings),
}
SERVICE_ORDER = tuple(SERVICES)


def service_settings(service: str, **overrides: Any) -> ServerSettings:
    """Settings of one service from TLM_<SERVICE>_... variables, then `overrides`."""
    _module, settings_cls = SERVICES[service]
    values = {k: v for k, v in overrides.items() if v is not None}
    return settings_cls(**values)


def bindings_for(services: Sequence[str], shared: ServerSettings) -> list[ServiceBinding]:
    """Bindings of `services` sharing `shared`'s server options (one process, one port)."""
    service_key = shared.service_api_key or next(
        (key for key, team in shared.api_keys.items() if team == SERVICE_TEAM), None
    )
    common = {
        "data_dir": shared.data_dir,
        "api_keys": shared.api_keys,
        "insecure_dev": shared.insecure_dev,
        "service_api_key": service_key,
    }
    result = []
    for name in services:
        module, settings_cls = SERVICES[name]
        settings = settings_cls.model_validate(common)
        result.append(module.binding(settings))
    return result


def up_settings(
    port: int | None, host: str | None, data_dir: Path | None, insecure_dev: bool | None
) -> ServerSettings:
    """Settings of `tlm up`: TLM_... variables, then command-line flags."""
    base = ServerSettings()
    overrides = {"port": port, "host": host, "data_dir": data_dir, "insecure_dev": insecure_dev}
    values = base.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    if not values["api_keys"] and insecure_dev is None:
        values["insecure_dev"] = True  # the embedded default: local, no keys, plainly logged
    values["data_dir"] = Path(values["data_dir"]).expanduser()
    return ServerSettings.model_validate(values)
