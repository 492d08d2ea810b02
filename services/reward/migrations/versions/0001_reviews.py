"""The review queue: one row per review, pending then answered.

A queue created before migrations (by `create_all`, the same schema) is adopted as it is.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from services.common.sql import existing_tables

revision = "0001"
down_revision = None


def upgrade() -> None:
    if existing_tables(("reviews",)):
        return
    op.create_table(
        "reviews",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("review_id", sa.String(32), nullable=False, unique=True),
        sa.Column("team", sa.String(128), nullable=False, index=True),
        sa.Column("review_key", sa.String(64), nullable=False),
        sa.Column("prompt_key", sa.String(64), nullable=False, index=True),
        sa.Column("key0", sa.String(64), nullable=False, index=True),
        sa.Column("key1", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.Integer, nullable=False),
        sa.Column("state", sa.Integer, nullable=False, index=True),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("candidates", sa.JSON, nullable=False),
        sa.Column("instructions", sa.String, nullable=False),
        sa.Column("rating_min", sa.Float, nullable=False),
        sa.Column("rating_max", sa.Float, nullable=False),
        sa.Column("dataset", sa.String(256), nullable=False),
        sa.Column("scorer", sa.String(64), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answer", sa.JSON, nullable=True),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dataset_revision", sa.String(256), nullable=False),
        sa.UniqueConstraint("team", "review_key"),
    )


def downgrade() -> None:
    op.drop_table("reviews")
