"""Alembic environment of the trainer's job store: `services.common.sql` runs it on open."""

from __future__ import annotations

from services.common.sql import run_migrations
from services.trainer.store import VERSION_TABLE, Base

run_migrations(Base.metadata, VERSION_TABLE)
