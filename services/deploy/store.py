"""Deployment storage: one SQL table (SQLite under the data directory by default, PostgreSQL when
deployed, `TLM_DEPLOY_DATABASE_URL`), opened through the shared SQL setup
(`services.common.sql`), which runs the Alembic migrations in `migrations/`; a change to the
table needs a new migration. Every query is scoped by team. Every write compares the row's
generation with the one the writer read (optimistic concurrency), so two deploy replicas, or a
roll finishing after a newer update, never overwrite each other. Calls are short and blocking.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from services.common import sql
from services.common.errors import Aborted, AlreadyExists
from services.deploy.domain import (
    Deployment,
    DeploymentNotFound,
    DeploymentState,
    Resolved,
    SamplingDefaults,
    Spec,
)
from services.specs.names import DEPLOYMENT_PREFIX

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "deploy_alembic_version"  # its own, so the stores can share one database


class Base(DeclarativeBase):
    pass


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        Index("ux_deployments_team_id", "team", "deployment_id", unique=True),
        sql.unique_when_set("ux_deployments_team_request", "team", "request_id"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team: Mapped[str] = mapped_column(String(128))
    deployment_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(128), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[int] = mapped_column(Integer)
    state_reason: Mapped[str] = mapped_column(String, default="")
    current: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    pending: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    previous: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    generation: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _now() -> datetime:
    return datetime.now(UTC)


def _resolved(value: dict[str, str] | None) -> Resolved | None:
    return Resolved(**value) if value else None


def _spec_json(spec: Spec) -> dict[str, Any]:
    data = asdict(spec)
    data["sampling"]["stop"] = list(spec.sampling.stop)
    return data


def _spec(data: dict[str, Any]) -> Spec:
    sampling = dict(data.get("sampling") or {})
    sampling["stop"] = tuple(sampling.get("stop") or ())
    return Spec(**{**data, "sampling": SamplingDefaults(**sampling)})


def _deployment(row: DeploymentRow) -> Deployment:
    return Deployment(
        deployment_id=row.deployment_id,
        team=row.team,
        spec=_spec(row.spec),
        state=DeploymentState(row.state),
        state_reason=row.state_reason,
        current=_resolved(row.current),
        pending=_resolved(row.pending),
        previous=_resolved(row.previous),
        generation=row.generation,
        request_id=row.request_id,
        create_time=sql.utc(row.create_time),
        update_time=sql.utc(row.update_time),
    )


def _fill(row: DeploymentRow, d: Deployment) -> None:
    row.spec = _spec_json(d.spec)
    row.state = int(d.state)
    row.state_reason = d.state_reason
    row.current = asdict(d.current) if d.current else None
    row.pending = asdict(d.pending) if d.pending else None
    row.previous = asdict(d.previous) if d.previous else None
    row.generation = d.generation
    row.update_time = _now()


class DeploymentStore:
    def __init__(self, url: str) -> None:
        self.engine = sql.open_store(url, MIGRATIONS, VERSION_TABLE)

    def close(self) -> None:
        self.engine.dispose()

    def create(self, d: Deployment) -> tuple[Deployment, bool]:
        """Insert `d`; (existing, False) when its request_id was used already."""
        if d.request_id:
            existing = self.find_request(d.team, d.request_id)
            if existing is not None:
                return existing, False
        now = _now()
        row = DeploymentRow(
            team=d.team, deployment_id=d.deployment_id, request_id=d.request_id, create_time=now
        )
        _fill(row, d)
        try:
            with sql.write_session(self.engine) as session:
                session.add(row)
                session.flush()
                return _deployment(row), True
        except IntegrityError:
            existing = self.find_request(d.team, d.request_id) if d.request_id else None
            if existing is not None:
                return existing, False
            raise AlreadyExists(f"{d.name} already exists", metadata={"resource": d.name}) from None

    def find_request(self, team: str, request_id: str) -> Deployment | None:
        with Session(self.engine) as session:
            row = session.scalar(
                select(DeploymentRow).where(
                    DeploymentRow.team == team, DeploymentRow.request_id == request_id
                )
            )
            return _deployment(row) if row else None

    def get(self, team: str, deployment_id: str) -> Deployment:
        with Session(self.engine) as session:
            return _deployment(self._row(session, team, deployment_id))

    @staticmethod
    def _row(session: Session, team: str, deployment_id: str) -> DeploymentRow:
        row = session.scalar(
            select(DeploymentRow).where(
                DeploymentRow.team == team, DeploymentRow.deployment_id == deployment_id
            )
        )
        if row is None:
            name = DEPLOYMENT_PREFIX + deployment_id
            raise DeploymentNotFound(f"{name} not found", metadata={"resource": name})
        return row

    def list_after(self, team: str, after: str, limit: int) -> list[Deployment]:
        """Up to `limit` deployments of `team` named after `after`, by name."""
        with Session(self.engine) as session:
            rows = session.scalars(
                select(DeploymentRow)
                .where(DeploymentRow.team == team, DeploymentRow.deployment_id > after)
                .order_by(DeploymentRow.deployment_id)
                .limit(limit)
            )
            return [_deployment(r) for r in rows]

    def every(self) -> list[Deployment]:
        """Every team's deployments (the periodic alias refresh)."""
        with Session(self.engine) as session:
            return [_deployment(r) for r in session.scalars(select(DeploymentRow))]

    def save(self, d: Deployment) -> Deployment:
        """Write `d` if the row is still at d.generation; returns it at the next generation.
        Aborted when another write came first."""
        with sql.write_session(self.engine) as session:
            row = self._row(session, d.team, d.deployment_id)
            if row.generation != d.generation:
                raise Aborted(
                    f"{d.name} changed meanwhile (etag {d.etag} is stale); read it again",
                    metadata={"resource": d.name},
                )
            saved = replace(d, generation=d.generation + 1)
            _fill(row, saved)
            session.flush()
            return _deployment(row)

    def delete(self, team: str, deployment_id: str) -> None:
        with sql.write_session(self.engine) as session:
            self._row(session, team, deployment_id)
            session.execute(
                delete(DeploymentRow).where(
                    DeploymentRow.team == team, DeploymentRow.deployment_id == deployment_id
                )
            )
