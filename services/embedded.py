"""`tlm up` and `tlm serve`: which services run in a process and with what settings."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.settings import ServerSettings
from services.deploy.settings import DeploySettings
from services.registry.settings import RegistrySettings
from services.reward.settings import RewardSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from services.common.server import ServiceBinding

# Each service's app module (imported when it is bound: `tlm serve registry` does not load
# the rollout's torch) and settings class.
SERVICES: dict[str, tuple[str, type[ServerSettings]]] = {
    "registry": ("services.registry.app", RegistrySettings),
    "reward": ("services.reward.app", RewardSettings),
    "rollout": ("services.rollout.app", RolloutSettings),
    "trainer": ("services.trainer.app", TrainerSettings),
    "deploy": ("services.deploy.app", DeploySettings),
}
SERVICE_ORDER = tuple(SERVICES)


def binding(service: str, settings: ServerSettings) -> ServiceBinding:
    """The binding of `service` (a key of SERVICES) with `settings`."""
    app = importlib.import_module(SERVICES[service][0])
    result: ServiceBinding = app.binding(settings)
    return result


def service_settings(service: str, **overrides: Any) -> ServerSettings:
    """Settings of one service from TLM_<SERVICE>_... variables, then `overrides`."""
    _app, settings_cls = SERVICES[service]
    values = {k: v for k, v in overrides.items() if v is not None}
    return settings_cls(**values)


def bindings_for(services: Sequence[str], shared: ServerSettings) -> list[ServiceBinding]:
    """Bindings of `services` sharing `shared`'s server options (one process, one port)."""
    service_key = shared.outgoing_key()
    common = {
        "data_dir": shared.data_dir,
        "api_keys": shared.api_keys,
        "insecure_dev": shared.insecure_dev,
        "service_api_key": service_key,
    }
    return [binding(name, SERVICES[name][1].model_validate(common)) for name in services]


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
