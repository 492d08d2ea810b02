"""Runtime settings of the trainer service, from `TLM_TRAINER_...` environment variables.

Jobs keep their folders (worker logs, checkpoints, the model cache) and the SQLite job store
under `<data_dir>/trainer`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class TrainerSettings(ServerSettings):
    """`TLM_TRAINER_...`: where jobs keep their work and the addresses of other services."""

    model_config = SettingsConfigDict(env_prefix="TLM_TRAINER_", extra="ignore")

    # Other services; unset means this server's own address (`tlm up`).
    registry_address: str | None = None
    reward_address: str | None = None
    rollout_address: str | None = None
    # Workers running at once; more jobs wait PENDING.
    max_running_jobs: int = Field(1, ge=1)
    # How long an online-RL job waits for a rollout, reward or registry service that stays
    # unreachable (after its client's own retries) before it fails UNAVAILABLE naming it.
    outage_timeout_s: float = Field(600.0, gt=0)
    # Times a job's worker that died without a word (SIGKILL, OOM, a segfault) is started
    # again from its last checkpoint before the job fails.
    max_restarts: int = Field(3, ge=0)
