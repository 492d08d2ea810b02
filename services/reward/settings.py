"""Runtime settings of the reward service, from `TLM_REWARD_...` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RewardSettings(ServerSettings):
    """`TLM_REWARD_...`: concurrency limits, caches and the addresses of other services."""

    model_config = SettingsConfigDict(env_prefix="TLM_REWARD_", extra="ignore")

    # Unset: the server's own address (`tlm up` runs every service in one process).
    registry_address: str | None = None
    rollout_address: str | None = None
    # The review queue's database (an SQLAlchemy URL). Unset: SQLite under data_dir, which only
    # this replica sees; with several replicas, one PostgreSQL database shared by all of them.
    database_url: str | None = None
    # Batches of samples scored at once (a Score call, or a StreamScore stream while it has
    # samples being scored); each active team is guaranteed max(1, this // active teams) of
    # them, and a call beyond its team's share when all are taken gets RESOURCE_EXHAUSTED.
    max_concurrent_requests: int = Field(64, ge=1)
    # A StreamScore stream with nothing to score for this long is closed (DEADLINE_EXCEEDED).
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    max_samples_per_request: int = Field(4096, ge=1)
    # Deterministic outcomes kept in the LRU cache; 0 disables it.
    cache_entries: int = Field(100_000, ge=0)
    # Processes running rule scorers; 0 runs them in a thread of the server process, for
    # trusted input only: one hostile math answer can hold that process's GIL (SECURITY.md).
    rule_workers: int = Field(2, ge=0)
    # Sandboxed code runs at once.
    sandbox_slots: int = Field(2, ge=1)
    # Unprivileged uid base for sandboxes (slot i runs as base + i) when the service is root.
    sandbox_uid_base: int = Field(64000, ge=1000)
    # Reward models (model scorers) kept loaded, least recently used evicted; on `device`.
    loaded_models: int = Field(2, ge=1)
    device: str = "cpu"
    # Operator caps on the code scorer's limits; a spec asking for more gets the cap.
    sandbox_max_cpu_seconds: int = Field(60, ge=1)
    sandbox_max_memory_mb: int = Field(4096, ge=64)
    sandbox_max_processes: int = Field(64, ge=1)
    sandbox_max_file_mb: int = Field(100, ge=0)
    # How a code sample's whole process tree is held to its memory_mb: "cgroup" (a child of
    # `sandbox_cgroup` per sample; without a usable one, code samples are ERROR), "rlimit"
    # (memory_mb / max_processes of address space per process), "auto" (cgroup when usable).
    sandbox_memory_mode: Literal["auto", "cgroup", "rlimit"] = "auto"
    # A cgroup v2 directory delegated to the service: writable, `memory` and `pids` in its
    # cgroup.controllers, no processes of its own (the service itself lives in a sibling).
    sandbox_cgroup: Path | None = None
    # Largest code or `metadata.<tests_field>` value (UTF-8 KiB) the code scorer runs; checked
    # before anything parses it.
    sandbox_max_source_kb: int = Field(256, ge=1, le=16 * 1024)
    # Remote scorers: the only credentials ever sent to another address, as JSON
    # {"host:port": "ENV_VAR_NAME"}. A spec's `api_key_env` must name the entry for its own
    # address; the service's own API key is never sent to an address a spec chose.
    remote_keys: dict[str, str] = Field(default_factory=dict)
    # Judge scorers: rollout addresses a spec may name besides `rollout_address` (the service
    # key, which acts for any team, is sent to the rollout service).
    judge_rollout_addresses: list[str] = Field(default_factory=list)
