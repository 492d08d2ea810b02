"""The registry's SQL schema (SQLAlchemy 2). Migrations in `migrations/` create it; the same
code runs on SQLite (embedded) and PostgreSQL (deployed).

One pair of tables serves models, datasets and evaluators: a resource row per named resource
and an immutable revision row per revision, its facts as JSON (the revision message in proto3
JSON form) so that new metadata needs no migration.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ResourceRow(Base):
    __tablename__ = "resources"
    __table_args__ = (UniqueConstraint("team", "collection", "resource_id"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team: Mapped[str] = mapped_column(String(128))
    collection: Mapped[str] = mapped_column(String(16))
    resource_id: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    dataset_kind: Mapped[int] = mapped_column(Integer, default=0)
    aliases: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    etag: Mapped[str] = mapped_column(String(32))
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RevisionRow(Base):
    __tablename__ = "revisions"
    __table_args__ = (
        UniqueConstraint("resource_pk", "seq"),
        Index("ix_revisions_request", "resource_pk", "request_id"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("resources.pk", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(128), default="")
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    blobs: Mapped[list[str]] = mapped_column(JSON, default=list)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RetiredNameRow(Base):
    """A deleted resource's name and the highest revision number it reached. A resource
    created again under that name numbers its revisions on from there, so a revision name
    (which caches and lineage key on) never comes to mean other bytes."""

    __tablename__ = "retired_names"

    team: Mapped[str] = mapped_column(String(128), primary_key=True)
    collection: Mapped[str] = mapped_column(String(16), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer)
