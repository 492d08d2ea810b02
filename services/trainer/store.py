"""Job storage: a jobs table and an append-only events table (SQLAlchemy; SQLite by default).

The schema comes from the Alembic migrations in `migrations/`, run on open through the shared
SQL setup (`services.common.sql`); a change to these tables needs a new migration. Every query
is scoped by team, so another team's jobs are simply not found. Calls are short and blocking.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from services.common import sql
from services.trainer.domain import (
    TRANSITIONS,
    Event,
    EventKind,
    Job,
    JobError,
    JobNotFound,
    JobState,
    Progress,
)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "trainer_alembic_version"  # its own, so the stores can share one database


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    # request_id is unique per team where it is set (a partial index, also on PostgreSQL).
    __table_args__ = (sql.unique_when_set("ux_jobs_team_request", "team", "request_id"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    team: Mapped[str] = mapped_column(String(128), index=True)
    request_id: Mapped[str] = mapped_column(String(128), default="")
    request_digest: Mapped[str] = mapped_column(String(64), default="", server_default="")
    display_name: Mapped[str] = mapped_column(String, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    method: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[int] = mapped_column(Integer, index=True)
    device_plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    output_model_revision: Mapped[str] = mapped_column(String, default="")
    final_metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seq: Mapped[int] = mapped_column(Integer, default=-1)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_events_job_seq", "job_pk", "seq", unique=True),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


def now() -> datetime:
    return datetime.now(UTC)


def _job(row: JobRow) -> Job:
    error = JobError(**row.error) if row.error else None
    return Job(
        job_id=row.job_id,
        team=row.team,
        spec=dict(row.spec),
        state=JobState(row.state),
        device_plan=dict(row.device_plan or {}),
        progress=Progress(row.step, row.total_steps, row.epoch, dict(row.metrics or {})),
        create_time=sql.utc(row.create_time) or now(),
        display_name=row.display_name,
        request_id=row.request_id,
        request_digest=row.request_digest or "",
        labels=dict(row.labels or {}),
        output_model_revision=row.output_model_revision,
        final_metrics=dict(row.final_metrics or {}),
        error=error,
        start_time=sql.utc(row.start_time),
        end_time=sql.utc(row.end_time),
        checkpoint_step=row.checkpoint_step,
        cancel_requested=row.cancel_requested,
    )


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = sql.open_store(url, MIGRATIONS, VERSION_TABLE)

    def close(self) -> None:
        self.engine.dispose()

    # Jobs ----------------------------------------------------------------------------------

    def create(self, job: Job) -> tuple[Job, bool]:
        """Insert `job` (its first event: PENDING) unless its request_id exists; (job, created)."""
        try:
            return self._create(job)
        except IntegrityError:  # a concurrent create with the same request_id won
            existing = self.find_request(job.team, job.request_id) if job.request_id else None
            if existing is None:
                raise
            return existing, False

    def _create(self, job: Job) -> tuple[Job, bool]:
        with sql.write_session(self.engine) as s:
            if job.request_id:
                existing = s.scalar(
                    select(JobRow).where(
                        JobRow.team == job.team, JobRow.request_id == job.request_id
                    )
                )
                if existing is not None:
                    return _job(existing), False
            row = JobRow(
                job_id=job.job_id,
                team=job.team,
                request_id=job.request_id,
                request_digest=job.request_digest,
                display_name=job.display_name,
                labels=job.labels,
                method=int(job.method),
                spec=job.spec,
                state=int(job.state),
                device_plan=job.device_plan,
                create_time=job.create_time,
            )
            s.add(row)
            s.flush()
            self._append(s, row, EventKind.STATE, {"state": int(job.state), "message": "created"})
            return _job(row), True

    def find_request(self, team: str, request_id: str) -> Job | None:
        with Session(self.engine) as s:
            query = select(JobRow).where(JobRow.team == team, JobRow.request_id == request_id)
            row = s.scalar(query)
            return _job(row) if row is not None else None

    def get(self, team: str, job_id: str) -> Job:
        with Session(self.engine) as s:
            return _job(self._row(s, team, job_id))

    def page(
        self, team: str, limit: int, before_pk: int | None, state: int, method: int
    ) -> tuple[list[Job], int | None]:
        """Newest first; returns the page and the pk to continue before (None at the end)."""
        query = select(JobRow).where(JobRow.team == team)
        if state:
            query = query.where(JobRow.state == state)
        if method:
            query = query.where(JobRow.method == method)
        if before_pk is not None:
            query = query.where(JobRow.pk < before_pk)
        with Session(self.engine) as s:
            rows = list(s.scalars(query.order_by(JobRow.pk.desc()).limit(limit + 1)))
            more = len(rows) > limit
            rows = rows[:limit]
            return [_job(r) for r in rows], rows[-1].pk if more else None

    def jobs_in(self, states: Sequence[JobState]) -> list[Job]:
        """Every team's jobs in `states`, oldest first (start-up recovery, scheduling)."""
        with Session(self.engine) as s:
            query = select(JobRow).where(JobRow.state.in_([int(x) for x in states]))
            return [_job(r) for r in s.scalars(query.order_by(JobRow.pk))]

    def transition(
        self, team: str, job_id: str, state: JobState, message: str, **fields: Any
    ) -> Job:
        """Move a job to `state` (checked against TRANSITIONS), record the event, set fields."""
        with sql.write_session(self.engine) as s:
            row = self._row(s, team, job_id)
            current = JobState(row.state)
            if state not in TRANSITIONS[current]:
                raise ValueError(f"{job_id}: {current.name} -> {state.name} is not allowed")
            row.state = int(state)
            if state is JobState.RUNNING:
                row.start_time = now()
            if state.terminal:
                row.end_time = now()
            self._set(row, fields)
            data: dict[str, Any] = {"state": int(state), "message": message}
            self._append(s, row, EventKind.STATE, data)
            return _job(row)

    def update(self, team: str, job_id: str, **fields: Any) -> Job:
        with sql.write_session(self.engine) as s:
            row = self._row(s, team, job_id)
            self._set(row, fields)
            return _job(row)

    # Events --------------------------------------------------------------------------------

    def append(
        self,
        team: str,
        job_id: str,
        kind: EventKind,
        data: dict[str, Any],
        at: datetime | None = None,
    ) -> Job:
        """Record a non-state event (`at`: when it happened, default now); metrics/checkpoints
        also update the job's progress."""
        with sql.write_session(self.engine) as s:
            row = self._row(s, team, job_id)
            self._append(s, row, kind, data, at)
            if kind is EventKind.METRICS:
                row.step = int(data["step"])
                row.epoch = float(data.get("epoch", 0.0))
                row.metrics = dict(row.metrics or {}) | dict(data["values"])
            elif kind is EventKind.CHECKPOINT:
                row.checkpoint_step = int(data["step"])
            return _job(row)

    def events(self, team: str, job_id: str, from_seq: int) -> list[Event]:
        with Session(self.engine) as s:
            row = self._row(s, team, job_id)
            query = (
                select(EventRow)
                .where(EventRow.job_pk == row.pk, EventRow.seq >= from_seq)
                .order_by(EventRow.seq)
            )
            return [
                Event(e.seq, sql.utc(e.time) or now(), EventKind(e.kind), dict(e.data))
                for e in s.scalars(query)
            ]

    # Helpers -------------------------------------------------------------------------------

    @staticmethod
    def _row(s: Session, team: str, job_id: str) -> JobRow:
        row = s.scalar(select(JobRow).where(JobRow.team == team, JobRow.job_id == job_id))
        if row is None:
            raise JobNotFound(f"jobs/{job_id}")
        return row

    @staticmethod
    def _set(row: JobRow, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key == "error":
                value = {"code": value.code, "message": value.message} if value else None
            setattr(row, key, value)

    @staticmethod
    def _append(
        s: Session, row: JobRow, kind: EventKind, data: dict[str, Any], at: datetime | None = None
    ) -> None:
        row.last_seq += 1
        when = at or now()
        s.add(EventRow(job_pk=row.pk, seq=row.last_seq, time=when, kind=str(kind), data=data))


def new_job_id() -> str:
    """Sortable by creation time, unguessable: `j-<unix ms hex>-<random>`."""
    return f"j-{int(now().timestamp() * 1000):x}-{secrets.token_hex(4)}"
