"""Runtime settings of the rollout service, from `TLM_ROLLOUT_...` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RolloutSettings(ServerSettings):
    """`TLM_ROLLOUT_...`: engine choice, queue bounds and the registry address."""

    model_config = SettingsConfigDict(env_prefix="TLM_ROLLOUT_", extra="ignore")

    registry_address: str | None = None
    engine: str = "transformers"
    device: str = "cpu"
    max_queue: int = 256
    max_n: int = 64
    max_batch_prompts: int = 64
    model_revision: str | None = None  # loaded at start when set
