"""Runtime settings from the environment, one class per service (`TLM_<SERVICE>_...`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.auth import SERVICE_TEAM
from services.common.ids import ID_RULE, is_valid_id

DEFAULT_PORT = 50051


class ServerSettings(BaseSettings):
    """What every gRPC server needs. Subclasses set the env prefix, e.g. `TLM_REGISTRY_`."""

    model_config = SettingsConfigDict(env_prefix="TLM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="0 picks a free port (tests).")
    # API key -> team, e.g. TLM_REGISTRY_API_KEYS='{"k-123": "team-a"}'.
    api_keys: dict[str, str] = Field(default_factory=dict)
    # With no keys configured, serve every caller as team "dev" (logged loudly). Only for local use.
    insecure_dev: bool = False
    # Key this service sends (with the caller's team in x-tlm-team) when it calls other services.
    service_api_key: str | None = None
    # TLS: serve with this certificate chain and key (PEM files); with a client CA as well,
    # callers must present a certificate it signed (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    metrics_port: int | None = Field(None, ge=0, le=65535)
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period_s: float = 5.0
    data_dir: Path = Path("~/.local/share/tlm").expanduser()
    log_json: bool | None = None  # None: JSON when stderr is not a terminal.
    log_level: str = "info"

    def outgoing_key(self) -> str | None:
        """The key this process sends to the other services: `service_api_key`, else the first
        key of the service team in `api_keys`."""
        return self.service_api_key or next(
            (key for key, team in self.api_keys.items() if team == SERVICE_TEAM), None
        )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file are set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @field_validator("api_keys")
    @classmethod
    def _keys_valid(cls, keys: dict[str, str]) -> dict[str, str]:
        for key, team in keys.items():
            if not key or not team:
                raise ValueError("api_keys maps non-empty keys to non-empty team names")
            if team != SERVICE_TEAM and not is_valid_id(team):
                # Teams become folders: refuse the table at start-up, not call by call.
                raise ValueError(f"api_keys: team {team!r} is not valid: expected {ID_RULE}")
        return keys
