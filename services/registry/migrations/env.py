"""Alembic environment of the registry: `services.common.sql` runs it for `store.migrate`."""

from __future__ import annotations

from services.common.sql import run_migrations
from services.registry.store import VERSION_TABLE
from services.registry.tables import Base

run_migrations(Base.metadata, VERSION_TABLE)
