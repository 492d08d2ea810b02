"""Alembic environment of the reward review queue: `services.common.sql` runs it on open."""

from __future__ import annotations

from services.common.sql import run_migrations
from services.reward.review_store import VERSION_TABLE, Base

run_migrations(Base.metadata, VERSION_TABLE)
