"""Runtime settings of the HTTP gateway, from `TLM_GATEWAY_...` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings

DEFAULT_HTTP_PORT = 8080


class GatewaySettings(ServerSettings):
    """`TLM_GATEWAY_...`: the HTTP port and the services behind it. API keys, TLS and logging
    are the same settings as every gRPC server's: a key maps to a team as it does there."""

    model_config = SettingsConfigDict(env_prefix="TLM_GATEWAY_", extra="ignore")

    port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="HTTP; 0 picks a free port.")
    # The deploy service, which names what each deployment serves; unset: the `tlm up` server,
    # else TLM_DEPLOY_ADDRESS, else TLM_ADDRESS.
    deploy_address: str | None = None
    # The serving pool (the same as TLM_DEPLOY_ROLLOUT_ADDRESS); unset: the `tlm up` server,
    # else TLM_ROLLOUT_ADDRESS, else TLM_ADDRESS.
    rollout_address: str | None = None
    # Deadline of one generation, streamed or not.
    request_timeout_s: float = Field(600.0, gt=0)
