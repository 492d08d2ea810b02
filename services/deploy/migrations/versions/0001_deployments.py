"""Deployments.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

REQUEST_WHERE = sa.text("request_id != ''")


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("deployment_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("state_reason", sa.String, nullable=False),
        sa.Column("current", sa.JSON, nullable=True),
        sa.Column("pending", sa.JSON, nullable=True),
        sa.Column("previous", sa.JSON, nullable=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_deployments_team_id", "deployments", ["team", "deployment_id"], unique=True)
    # request_id is unique per team where it is set: a partial index, also on PostgreSQL.
    op.create_index(
        "ux_deployments_team_request",
        "deployments",
        ["team", "request_id"],
        unique=True,
        sqlite_where=REQUEST_WHERE,
        postgresql_where=REQUEST_WHERE,
    )


def downgrade() -> None:
    op.drop_table("deployments")
