"""The one SQL setup of the registry, review-queue and job stores: migrations that build exactly
the tables the code maps (SQLite and PostgreSQL), the same SQLite pragmas everywhere, stores
created by older versions (without migrations) upgraded in place, one PostgreSQL database
shared by all three, and replicas that open a new database at the same time."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, create_engine, inspect, text

from services.common import sql
from services.registry import store as registry_store
from services.registry import tables as registry_tables
from services.reward import review_store
from services.trainer import store as job_store
from services.trainer.domain import JobState
from tests.registry.conftest import fresh_postgres_database, postgres_url


@dataclass(frozen=True)
class Store:
    open: Callable[[str], Any]  # opens (and migrates) the store at a URL
    engine: Callable[[Any], Engine]
    metadata: MetaData
    version_table: str


def _registry(url: str) -> registry_store.MetadataStore:
    store = registry_store.MetadataStore(url)
    store.migrate()
    return store


STORES = {
    "registry": Store(
        _registry, lambda s: s.engine, registry_tables.Base.metadata, "alembic_version"
    ),
    "reward": Store(
        review_store.ReviewStore,
        lambda s: s.engine,
        review_store.Base.metadata,
        "reward_alembic_version",
    ),
    "trainer": Store(
        job_store.JobStore, lambda s: s.engine, job_store.Base.metadata, "trainer_alembic_version"
    ),
}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield fresh_postgres_database(postgres_url() or "")


def _version(engine: Engine, table: str) -> list[str]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(text(f"SELECT version_num FROM {table}"))]


@pytest.mark.parametrize("name", sorted(STORES))
def test_migrations_build_exactly_the_mapped_tables(database_url: str, name: str) -> None:
    store = STORES[name]
    opened = store.open(database_url)
    engine = store.engine(opened)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": store.version_table})
        drift = compare_metadata(context, store.metadata)
    assert drift == []
    assert _version(engine, store.version_table) == ["0001" if name != "registry" else "0002"]
    opened.close()
    store.open(database_url).close()  # opening again migrates nothing and fails nothing


def test_every_store_sets_the_same_sqlite_pragmas(tmp_path: Path) -> None:
    seen = {}
    for name, store in STORES.items():
        opened = store.open(f"sqlite:///{tmp_path / name}.db")
        with store.engine(opened).connect() as conn:
            seen[name] = tuple(
                conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            )
        opened.close()
    assert set(seen.values()) == {("wal", 1, 30000, 2)}  # synchronous 2 is FULL


# What the trainer's first release created with `create_all` (no request_digest, a non-unique
# request index), and what the last version before migrations created.
TRAINER_FIRST_RELEASE = """
CREATE TABLE jobs (
    pk INTEGER NOT NULL, job_id VARCHAR(64) NOT NULL, team VARCHAR(128) NOT NULL,
    request_id VARCHAR(128) NOT NULL, display_name VARCHAR NOT NULL, labels JSON NOT NULL,
    method INTEGER NOT NULL, spec JSON NOT NULL, state INTEGER NOT NULL,
    device_plan JSON NOT NULL, step INTEGER NOT NULL, total_steps INTEGER NOT NULL,
    epoch FLOAT NOT NULL, metrics JSON NOT NULL, output_model_revision VARCHAR NOT NULL,
    final_metrics JSON NOT NULL, error JSON, checkpoint_step INTEGER NOT NULL,
    cancel_requested BOOLEAN NOT NULL, last_seq INTEGER NOT NULL, create_time DATETIME NOT NULL,
    start_time DATETIME, end_time DATETIME, PRIMARY KEY (pk), UNIQUE (job_id)
);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_team ON jobs (team);
CREATE INDEX ix_jobs_team_request ON jobs (team, request_id);
CREATE TABLE job_events (
    pk INTEGER NOT NULL, job_pk INTEGER NOT NULL, seq INTEGER NOT NULL, time DATETIME NOT NULL,
    kind VARCHAR(16) NOT NULL, data JSON NOT NULL, PRIMARY KEY (pk)
);
CREATE UNIQUE INDEX ix_events_job_seq ON job_events (job_pk, seq);
"""
TRAINER_BEFORE_MIGRATIONS = (
    TRAINER_FIRST_RELEASE.replace(
        "request_id VARCHAR(128) NOT NULL,",
        "request_id VARCHAR(128) NOT NULL, request_digest VARCHAR(64) DEFAULT '' NOT NULL,",
    )
    .replace("CREATE INDEX ix_jobs_team_request ON jobs (team, request_id);", "")
    .replace(
        "CREATE INDEX ix_jobs_team ON jobs (team);",
        "CREATE INDEX ix_jobs_team ON jobs (team);\n"
        "CREATE UNIQUE INDEX ux_jobs_team_request ON jobs (team, request_id) "
        "WHERE request_id != '';",
    )
)
OLD_JOB = {
    "pk": 1, "job_id": "j-old", "team": "a", "request_id": "r-1", "display_name": "",
    "labels": "{}", "method": 1, "spec": "{}", "state": int(JobState.SUCCEEDED),
    "device_plan": "{}", "step": 3, "total_steps": 3, "epoch": 1.0, "metrics": "{}",
    "output_model_revision": "models/m/revisions/r1", "final_metrics": "{}", "error": None,
    "checkpoint_step": 3, "cancel_requested": 0, "last_seq": 0,
    "create_time": "2026-01-02 03:04:05.000000", "start_time": None, "end_time": None,
}  # fmt: skip


def _legacy_sqlite(path: Path, schema: str, table: str, row: dict[str, Any]) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(schema)
        columns = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)
    db.close()


@pytest.mark.parametrize(
    "schema", [TRAINER_FIRST_RELEASE, TRAINER_BEFORE_MIGRATIONS], ids=["first", "last"]
)
def test_a_job_store_made_before_migrations_is_upgraded_in_place(
    tmp_path: Path, schema: str
) -> None:
    from tests.trainer.test_units import _job

    path = tmp_path / "jobs.db"
    _legacy_sqlite(path, schema, "jobs", OLD_JOB)
    store = job_store.JobStore(f"sqlite:///{path}")
    old = store.find_request("a", "r-1")
    assert old is not None and old.job_id == "j-old" and old.request_digest == ""
    assert old.state is JobState.SUCCEEDED and old.progress.step == 3
    again, created = store.create(_job("a", "r-1"))  # the request index holds for old rows
    assert not created and again.job_id == "j-old"
    new, created = store.create(_job("a", "r-2"))
    assert created and store.get("a", new.job_id).request_digest == ""
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("jobs")}
    assert "ux_jobs_team_request" in indexes and "ix_jobs_team_request" not in indexes
    assert _version(store.engine, "trainer_alembic_version") == ["0001"]
    store.close()


REVIEWS_BEFORE_MIGRATIONS = """
CREATE TABLE reviews (
    pk INTEGER NOT NULL, review_id VARCHAR(32) NOT NULL, team VARCHAR(128) NOT NULL,
    review_key VARCHAR(64) NOT NULL, prompt_key VARCHAR(64) NOT NULL, key0 VARCHAR(64) NOT NULL,
    key1 VARCHAR(64) NOT NULL, kind INTEGER NOT NULL, state INTEGER NOT NULL,
    prompt JSON NOT NULL, candidates JSON NOT NULL, instructions VARCHAR NOT NULL,
    rating_min FLOAT NOT NULL, rating_max FLOAT NOT NULL, dataset VARCHAR(256) NOT NULL,
    scorer VARCHAR(64) NOT NULL, create_time DATETIME NOT NULL, answer JSON,
    answer_time DATETIME, dataset_revision VARCHAR(256) NOT NULL, PRIMARY KEY (pk),
    UNIQUE (team, review_key), UNIQUE (review_id)
);
CREATE INDEX ix_reviews_key1 ON reviews (key1);
CREATE INDEX ix_reviews_prompt_key ON reviews (prompt_key);
CREATE INDEX ix_reviews_team ON reviews (team);
CREATE INDEX ix_reviews_state ON reviews (state);
CREATE INDEX ix_reviews_key0 ON reviews (key0);
"""


def test_a_review_queue_made_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    from services.reward.reviews import ReviewState

    path = tmp_path / "reviews.db"
    candidate = {"sample_id": "s1", "completion": "Paris", "key": "k1"}
    row = {
        "pk": 1, "review_id": "0" * 32, "team": "a", "review_key": "rk", "prompt_key": "pk",
        "key0": "k1", "key1": "", "kind": 1, "state": int(ReviewState.PENDING),
        "prompt": json.dumps({"text": "Capital of France?", "messages": []}),
        "candidates": json.dumps([candidate]), "instructions": "", "rating_min": 1.0,
        "rating_max": 5.0, "dataset": "prefs", "scorer": "people",
        "create_time": "2026-01-02 03:04:05.000000", "answer": None, "answer_time": None,
        "dataset_revision": "",
    }  # fmt: skip
    _legacy_sqlite(path, REVIEWS_BEFORE_MIGRATIONS, "reviews", row)
    store = review_store.ReviewStore(f"sqlite:///{path}")
    review = store.get("a", "0" * 32)
    assert review.prompt.text == "Capital of France?" and review.candidates[0].completion == "Paris"
    assert review.state == ReviewState.PENDING
    assert _version(store.engine, "reward_alembic_version") == ["0001"]
    store.close()


def test_the_three_stores_share_one_postgres_database() -> None:
    url = fresh_postgres_database(postgres_url() or "")
    opened = [store.open(url) for store in STORES.values()]
    engine = create_engine(url)
    for store in STORES.values():
        assert _version(engine, store.version_table)  # each records its own revision
    names = set(inspect(engine).get_table_names())
    for store in STORES.values():
        assert set(store.metadata.tables) <= names
    engine.dispose()
    for each in opened:
        each.close()


def test_replicas_opening_a_new_database_at_once_all_succeed() -> None:
    # Several reward replicas start together against one empty database: the migration runs
    # once, under the store's lock; none fails on tables another just created.
    url = fresh_postgres_database(postgres_url() or "")
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: review_store.ReviewStore(url), range(4)))
    assert _version(stores[0].engine, "reward_alembic_version") == ["0001"]
    for store in stores:
        store.close()


def test_a_write_session_commits_or_rolls_back_as_a_whole(tmp_path: Path) -> None:
    engine = sql.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with sql.write_session(engine) as s:
        s.execute(text("CREATE TABLE t (x INTEGER)"))
    with pytest.raises(RuntimeError), sql.write_session(engine) as s:
        s.execute(text("INSERT INTO t VALUES (1)"))
        raise RuntimeError("a failure half-way")
    with sql.write_session(engine) as s:
        s.execute(text("INSERT INTO t VALUES (2)"))
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT x FROM t"))] == [2]
    engine.dispose()
