"""Jobs and their append-only events.

A store created before migrations (by `create_all`, possibly before `request_digest` and the
unique request index existed) is adopted: what it lacks is added, its rows are kept.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from services.common.sql import existing_tables

revision = "0001"
down_revision = None

REQUEST_WHERE = sa.text("request_id != ''")


def upgrade() -> None:
    if existing_tables(("jobs", "job_events")) == {"jobs", "job_events"}:
        _adopt()
        return
    op.create_table(
        "jobs",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False, unique=True),
        sa.Column("team", sa.String(128), nullable=False, index=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False, server_default=""),
        sa.Column("display_name", sa.String, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("method", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("state", sa.Integer, nullable=False, index=True),
        sa.Column("device_plan", sa.JSON, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Float, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("output_model_revision", sa.String, nullable=False),
        sa.Column("final_metrics", sa.JSON, nullable=False),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("checkpoint_step", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    )
    _request_index()
    op.create_table(
        "job_events",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_pk", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_events_job_seq", "job_events", ["job_pk", "seq"], unique=True)


def _request_index() -> None:
    # request_id is unique per team where it is set: a partial index, also on PostgreSQL.
    op.create_index(
        "ux_jobs_team_request",
        "jobs",
        ["team", "request_id"],
        unique=True,
        sqlite_where=REQUEST_WHERE,
        postgresql_where=REQUEST_WHERE,
    )


def _adopt() -> None:
    inspector = sa.inspect(op.get_bind())
    if "request_digest" not in {c["name"] for c in inspector.get_columns("jobs")}:
        op.add_column(
            "jobs",
            sa.Column("request_digest", sa.String(64), nullable=False, server_default=""),
        )
    if "ux_jobs_team_request" not in {i["name"] for i in inspector.get_indexes("jobs")}:
        _request_index()
    # The first release's non-unique ix_jobs_team_request is superseded by the unique one.
    if "ix_jobs_team_request" in {i["name"] for i in inspector.get_indexes("jobs")}:
        op.drop_index("ix_jobs_team_request", "jobs")


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("jobs")
