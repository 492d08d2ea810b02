"""Runtime settings of the registry service, from `TLM_REGISTRY_...` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RegistrySettings(ServerSettings):
    """`TLM_REGISTRY_...`: database URL (SQLite default, PostgreSQL deployed) and blob store."""

    model_config = SettingsConfigDict(env_prefix="TLM_REGISTRY_", extra="ignore")

    database_url: str | None = None  # default: sqlite under data_dir
    blob_url: str | None = None  # default: file://<data_dir>/blobs; s3://bucket/prefix for S3
    s3_endpoint_url: str | None = None
    max_row_bytes: int = 1024 * 1024
    max_row_errors: int = 20
