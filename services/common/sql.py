"""The one SQL setup of every store (registry metadata, reward review queue, trainer jobs).

The same SQLAlchemy code runs on SQLite (embedded, a file under the data directory) and
PostgreSQL (deployed); the stores can share one PostgreSQL database, since each names its own
tables and keeps its Alembic version in its own table. Synchronous: callers run it in threads.

- `make_engine`: SQLite gets the same pragmas everywhere (WAL so readers never block the
  writer, a 30 s busy timeout, foreign keys, synchronous=FULL so an acknowledged write survives
  a power cut); PostgreSQL gets a pre-pinged pool.
- `write_session`: a transaction that takes SQLite's write lock up front (BEGIN IMMEDIATE), so
  a transaction that reads and then writes never fails to upgrade its lock under contention.
- `migrate`: Alembic to head on open, serialised between processes (several replicas of a
  service may start at once against one database); `open_store` is both.
- `unique_when_set`, `utc`: the pieces of table and row code the stores share.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Engine, Index, MetaData, create_engine, event, text
from sqlalchemy.orm import Session

BUSY_TIMEOUT_S = 30
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}",
    "PRAGMA synchronous=FULL",
)
WRITE = "tlm_write"  # execution option: this transaction writes (BEGIN IMMEDIATE on SQLite)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    """An engine for `url` with the pragmas or pool options every store uses."""
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True, pool_size=10)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's
        cursor = dbapi_conn.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the lock up front (no deadlocking lock upgrades); readers use WAL.
        write = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session in one write transaction: committed on success, rolled back on an error."""
    with Session(engine.execution_options(**{WRITE: True})) as session, session.begin():
        yield session


def migrate(engine: Engine, migrations: Path, version_table: str) -> None:
    """Bring the store's schema to the newest revision in `migrations` (idempotent; its env.py
    records it in `version_table`). Processes opening one database at once take turns: a
    PostgreSQL advisory lock, SQLite's write lock."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            key = zlib.crc32(version_table.encode())  # one lock per store, held to commit
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_store(url: str, migrations: Path, version_table: str) -> Engine:
    """`make_engine` for `url`, its schema brought to head by `migrate`."""
    engine = make_engine(url)
    migrate(engine, migrations, version_table)
    return engine


def unique_when_set(name: str, *columns: str, when: str = "request_id") -> Index:
    """A unique index on `columns` over the rows whose `when` column is set (not ''): a partial
    index on SQLite and PostgreSQL alike, so that an idempotency key is unique per team only
    where a caller gave one."""
    where = text(f"{when} != ''")
    return Index(name, *columns, unique=True, sqlite_where=where, postgresql_where=where)


@overload
def utc(t: datetime) -> datetime: ...
@overload
def utc(t: None) -> None: ...
def utc(t: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite hands `DateTime(timezone=True)` back
    without its zone.

    >>> utc(datetime(2026, 1, 2)).isoformat(), utc(None)
    ('2026-01-02T00:00:00+00:00', None)
    """
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def run_migrations(target_metadata: MetaData, version_table: str) -> None:
    """The body of each store's `migrations/env.py`: run on the connection `migrate` hands
    over, or on the configured URL (the `alembic` command line)."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, version_table=version_table
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(
            connection=conn, target_metadata=target_metadata, version_table=version_table
        )
        context.run_migrations()
    engine.dispose()


def existing_tables(names: tuple[str, ...]) -> set[str]:
    """Which of `names` exist, for an initial migration adopting a store that an older version
    created without migrations (by `create_all`)."""
    from sqlalchemy import inspect

    return set(names) & set(inspect(context.get_bind()).get_table_names())
