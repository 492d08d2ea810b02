"""Runtime settings of the reward service, from `TLM_REWARD_...` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RewardSettings(ServerSettings):
    """`TLM_REWARD_...`: concurrency limits, caches and the addresses of other services."""

    model_config = SettingsConfigDict(env_prefix="TLM_REWARD_", extra="ignore")

    registry_address: str | None = None
    rollout_address: str | None = None
    max_concurrent_requests: int = 64
    max_samples_per_request: int = 4096
    cache_entries: int = 100_000
    device: str = "cpu"
