"""Runtime settings of the deploy service, from `TLM_DEPLOY_...` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class DeploySettings(ServerSettings):
    """`TLM_DEPLOY_...`: the deployments' database, the registry and the serving pool."""

    model_config = SettingsConfigDict(env_prefix="TLM_DEPLOY_", extra="ignore")

    # SQLAlchemy URL of the deployments table; default SQLite at <data_dir>/deploy/deployments.db.
    # Every deploy replica must use the same one.
    database_url: str | None = None
    # The registry that resolves models and aliases; unset means this server's own address.
    registry_address: str | None = None
    # The serving pool: the rollout replicas that serve deployments, apart from the ones that
    # serve training rollouts (the trainer's TLM_TRAINER_ROLLOUT_ADDRESS). Unset means this
    # server's own address (`tlm up`: one rollout service for both).
    rollout_address: str | None = None
    # The serving pool's label, shown as Deployment.pool.
    pool: str = "serving"
    # Every this many seconds, re-resolve every deployment's alias and roll those that moved;
    # 0 turns the periodic refresh off (RefreshDeployment still works).
    refresh_interval_s: float = Field(30.0, ge=0)
    # How long one warm-up call (LoadModel, or the adapter's one-token Generate) may take.
    warmup_timeout_s: float = Field(600.0, gt=0)
