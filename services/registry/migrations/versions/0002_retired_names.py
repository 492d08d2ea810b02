"""Retired names: revision numbers are never reused after a resource is deleted.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "retired_names",
        sa.Column("team", sa.String(128), primary_key=True),
        sa.Column("collection", sa.String(16), primary_key=True),
        sa.Column("resource_id", sa.String(64), primary_key=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_names")
