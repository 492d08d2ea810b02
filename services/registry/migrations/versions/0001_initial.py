"""Resources and their immutable revisions.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("collection", sa.String(16), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("description", sa.String, nullable=False, server_default=""),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("dataset_kind", sa.Integer, nullable=False, server_default="0"),
        sa.Column("aliases", sa.JSON, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("team", "collection", "resource_id"),
    )
    op.create_table(
        "revisions",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "resource_pk",
            sa.Integer,
            sa.ForeignKey("resources.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("blobs", sa.JSON, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("resource_pk", "seq"),
    )
    op.create_index("ix_revisions_request", "revisions", ["resource_pk", "request_id"])


def downgrade() -> None:
    op.drop_index("ix_revisions_request", "revisions")
    op.drop_table("revisions")
    op.drop_table("resources")
