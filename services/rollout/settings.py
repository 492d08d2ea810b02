"""Runtime settings of the rollout service, from `TLM_ROLLOUT_...` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.ids import ID_RULE, is_valid_id
from services.common.settings import ServerSettings


class RolloutSettings(ServerSettings):
    """`TLM_ROLLOUT_...`: engine choice, queue bounds and the registry address."""

    model_config = SettingsConfigDict(env_prefix="TLM_ROLLOUT_", extra="ignore")

    registry_address: str | None = None  # default: this server's own address (`tlm up`)
    engine: str = "transformers"  # "transformers" or "vllm"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    # vLLM's engine-wide logprobs_mode: raw_logprobs serves LOGPROBS_MODE_RAW (and
    # TEMPERATURE_SCALED at temperature 1); processed_logprobs serves TEMPERATURE_SCALED (and RAW
    # at temperature 0 or 1) without top-k/top-p. The transformers engine serves both per request.
    vllm_logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    max_queue: int = Field(256, ge=1)  # requests accepted and not finished
    max_n: int = Field(64, ge=1)
    max_batch_prompts: int = Field(64, ge=1)  # prompts (each with its n samples) per batch
    model_revision: str | None = None  # loaded at start when set
    cache_dir: Path | None = None  # downloaded revisions; default <data_dir>/rollout-cache
    startup_team: str = "dev"  # the team model_revision is loaded for at start
    # Another team may replace the loaded model only after it has been idle this long.
    takeover_idle_s: float = Field(300.0, ge=0)

    @field_validator("startup_team")
    @classmethod
    def _team_valid(cls, team: str) -> str:
        if not is_valid_id(team):  # it names the model cache's folder, as any team does
            raise ValueError(f"startup_team {team!r} is not valid: expected {ID_RULE}")
        return team
