"""The review queue's storage: one SQLAlchemy table, SQLite under the data directory by default,
PostgreSQL when deployed (`TLM_REWARD_DATABASE_URL`), so that every reward replica sees one
queue. The shared SQL setup (`services.common.sql`) opens it and runs the Alembic migrations in
`migrations/`; a change to the table needs a new migration. Calls are blocking; the queue runs
them in a thread."""

from __future__ import annotations

import uuid
import zlib
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Integer,
    String,
    UniqueConstraint,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from services.common import sql
from services.reward.domain import Prompt
from services.reward.reviews import Answer, Candidate, Review, ReviewNotFound, ReviewState
from tlm.reward.v1 import evaluator_pb2 as ev

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "reward_alembic_version"  # its own, so the stores can share one database
TEAM_LOCKS = 0x7265_7677  # PostgreSQL advisory lock space of the review queue ("revw")


class Base(DeclarativeBase):
    pass


class ReviewRow(Base):
    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("team", "review_key"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    review_id: Mapped[str] = mapped_column(String(32), unique=True)
    team: Mapped[str] = mapped_column(String(128), index=True)
    review_key: Mapped[str] = mapped_column(String(64))
    prompt_key: Mapped[str] = mapped_column(String(64), index=True)
    key0: Mapped[str] = mapped_column(String(64), index=True)
    key1: Mapped[str] = mapped_column(String(64), index=True, default="")
    kind: Mapped[int] = mapped_column(Integer)
    state: Mapped[int] = mapped_column(Integer, index=True)
    prompt: Mapped[dict[str, Any]] = mapped_column(JSON)
    candidates: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    instructions: Mapped[str] = mapped_column(String, default="")
    rating_min: Mapped[float] = mapped_column(Float)
    rating_max: Mapped[float] = mapped_column(Float)
    dataset: Mapped[str] = mapped_column(String(256))
    scorer: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    answer_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dataset_revision: Mapped[str] = mapped_column(String(256), default="")


def _review(row: ReviewRow) -> Review:
    prompt = Prompt(
        text=row.prompt.get("text", ""),
        messages=tuple((m[0], m[1]) for m in row.prompt.get("messages", [])),
    )
    return Review(
        review_id=row.review_id,
        team=row.team,
        kind=row.kind,
        state=ReviewState(row.state),
        prompt=prompt,
        candidates=tuple(Candidate(**c) for c in row.candidates),
        instructions=row.instructions,
        rating_min=row.rating_min,
        rating_max=row.rating_max,
        dataset=row.dataset,
        scorer=row.scorer,
        create_time=sql.utc(row.create_time) or datetime.now(UTC),
        answer=Answer(**row.answer) if row.answer is not None else None,
        answer_time=sql.utc(row.answer_time),
        dataset_revision=row.dataset_revision,
    )


class TeamLock:
    """One team's submit lock, held until `release`. On PostgreSQL a session advisory lock on a
    connection of its own (closed on release, which frees the lock even if unlocking fails);
    elsewhere nothing: an SQLite queue belongs to one replica, which serialises its submits."""

    def __init__(self, connection: Connection | None) -> None:
        self.connection = connection

    def release(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class ReviewStore:
    def __init__(self, url: str) -> None:
        self.engine = sql.open_store(url, MIGRATIONS, VERSION_TABLE)

    def find_or_create(self, draft: Review, key: str, prompt_key: str) -> Review:
        """The team's review for `key`, created from `draft` if there is none."""
        existing = self._by_key(draft.team, key)
        if existing is not None:
            return existing
        keys = [c.key for c in draft.candidates] + [""]
        review_id = uuid.uuid4().hex
        row = ReviewRow(
            review_id=review_id,
            team=draft.team,
            review_key=key,
            prompt_key=prompt_key,
            key0=keys[0],
            key1=keys[1],
            kind=draft.kind,
            state=int(ReviewState.PENDING),
            prompt={
                "text": draft.prompt.text,
                "messages": [list(m) for m in draft.prompt.messages],
            },
            candidates=[asdict(c) for c in draft.candidates],
            instructions=draft.instructions,
            rating_min=draft.rating_min,
            rating_max=draft.rating_max,
            dataset=draft.dataset,
            scorer=draft.scorer,
            create_time=draft.create_time,
        )
        try:
            with sql.write_session(self.engine) as session:
                session.add(row)
        except IntegrityError:  # created concurrently: use that one
            found = self._by_key(draft.team, key)
            assert found is not None
            return found
        return self.get(draft.team, review_id)

    def _by_key(self, team: str, key: str) -> Review | None:
        with Session(self.engine) as session:
            row = session.scalars(
                select(ReviewRow).where(ReviewRow.team == team, ReviewRow.review_key == key)
            ).first()
            return _review(row) if row is not None else None

    def answered_with(self, team: str, candidate_key: str) -> Review | None:
        """The oldest answered review of `team` that asked about this candidate."""
        with Session(self.engine) as session:
            row = session.scalars(
                select(ReviewRow)
                .where(
                    ReviewRow.team == team,
                    ReviewRow.state == int(ReviewState.ANSWERED),
                    (ReviewRow.key0 == candidate_key) | (ReviewRow.key1 == candidate_key),
                )
                .order_by(ReviewRow.pk)
            ).first()
            return _review(row) if row is not None else None

    def get(self, team: str, review_id: str) -> Review:
        with Session(self.engine) as session:
            row = session.scalars(
                select(ReviewRow).where(ReviewRow.team == team, ReviewRow.review_id == review_id)
            ).first()
            if row is None:
                raise ReviewNotFound(f"reviews/{review_id} not found")
            return _review(row)

    def page(self, team: str, state: int, offset: int, limit: int) -> list[Review]:
        """Pending first, oldest first; `state` 0 means every state."""
        query = select(ReviewRow).where(ReviewRow.team == team)
        if state:
            query = query.where(ReviewRow.state == state)
        query = query.order_by(ReviewRow.state, ReviewRow.pk).offset(offset).limit(limit)
        with Session(self.engine) as session:
            return [_review(row) for row in session.scalars(query)]

    def answered_ratings(self, team: str, dataset: str, prompt_key: str) -> list[Review]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(ReviewRow)
                .where(
                    ReviewRow.team == team,
                    ReviewRow.dataset == dataset,
                    ReviewRow.prompt_key == prompt_key,
                    ReviewRow.kind == ev.REVIEW_KIND_RATING,
                    ReviewRow.state == int(ReviewState.ANSWERED),
                )
                .order_by(ReviewRow.pk)
            )
            return [_review(row) for row in rows]

    def mark_answered(
        self, team: str, review_id: str, answer: Answer, revision: str, when: datetime
    ) -> bool:
        """Record the answer if the review is still pending; False if it was answered first."""
        with sql.write_session(self.engine) as session:
            result = session.execute(
                update(ReviewRow)
                .where(
                    ReviewRow.team == team,
                    ReviewRow.review_id == review_id,
                    ReviewRow.state == int(ReviewState.PENDING),
                )
                .values(
                    state=int(ReviewState.ANSWERED),
                    answer=asdict(answer),
                    answer_time=when,
                    dataset_revision=revision,
                )
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def lock_team(self, team: str) -> TeamLock:
        """Wait for, then hold, `team`'s submit lock: replicas sharing the queue record one
        answer of a team at a time, so the rows appended match the answers recorded."""
        if self.engine.dialect.name != "postgresql":
            return TeamLock(None)
        connection = self.engine.connect()
        connection.detach()  # closing it ends the server session, and with it the lock
        key = zlib.crc32(team.encode()) - 2**31  # the lock key is a signed int4
        connection.execute(
            text("SELECT pg_advisory_lock(:space, :key)"), {"space": TEAM_LOCKS, "key": key}
        )
        return TeamLock(connection)

    def close(self) -> None:
        self.engine.dispose()
