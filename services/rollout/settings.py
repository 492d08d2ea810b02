"""Runtime settings of the rollout service, from `TLM_ROLLOUT_...` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.ids import ID_RULE, is_valid_id
from services.common.settings import ServerSettings

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    # vLLM engine only: GPUs one engine spans (tensor parallelism; from `device`'s index on),
    # the share of each GPU's memory it takes (weights and KV cache), and the largest LoRA rank
    # it can load (one of vLLM's sizes; a larger adapter is refused when it is loaded).
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    vllm_max_lora_rank: int = 64
    max_queue: int = Field(256, ge=1)  # requests accepted and not finished
    max_n: int = Field(64, ge=1)
    max_batch_prompts: int = Field(64, ge=1)  # prompts (each with its n samples) per batch
    model_revision: str | None = None  # loaded at start when set
    cache_dir: Path | None = None  # downloaded revisions; default <data_dir>/rollout-cache
    startup_team: str = "dev"  # the team model_revision is loaded for at start
    # Budget of the cache of loaded weights (models any request may name, pushed policies): least
    # recently used models that no request uses are evicted to stay under it. 0: no limit.
    cache_bytes: int = Field(8 << 30, ge=0)

    @field_validator("vllm_max_lora_rank")
    @classmethod
    def _lora_rank_vllm_has(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:  # vLLM's LoRAConfig.max_lora_rank choices
            raise ValueError(f"expected one of {', '.join(map(str, VLLM_LORA_RANKS))}, got {rank}")
        return rank

    @field_validator("startup_team")
    @classmethod
    def _team_valid(cls, team: str) -> str:
        if not is_valid_id(team):  # it names the model cache's folder, as any team does
            raise ValueError(f"startup_team {team!r} is not valid: expected {ID_RULE}")
        return team
