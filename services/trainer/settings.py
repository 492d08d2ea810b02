"""Runtime settings of the trainer service, from `TLM_TRAINER_...` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class TrainerSettings(ServerSettings):
    """`TLM_TRAINER_...`: where jobs keep their work and the addresses of other services."""

    model_config = SettingsConfigDict(env_prefix="TLM_TRAINER_", extra="ignore")

    registry_address: str | None = None
    reward_address: str | None = None
    rollout_address: str | None = None
    max_running_jobs: int = 1
