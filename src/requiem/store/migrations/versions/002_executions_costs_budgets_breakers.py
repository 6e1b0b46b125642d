"""Executions and the CAS objects tenants own, cost records, budgets, breakers.

Revision ID: 002
Revises: 001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
MONEY = sa.Numeric(18, 6)
BIG_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _tenant_fk(primary_key: bool = False) -> sa.Column:
    return sa.Column(
        "tenant_id",
        sa.String(64),
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


def upgrade() -> None:
    op.create_table(
        "executions",
        sa.Column("id", sa.String(64), primary_key=True),
        _tenant_fk(),
        sa.Column("actor", sa.String(128)),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("result_digest", sa.String(64)),
        sa.Column("result_blob", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("error_code", sa.String(64)),
        sa.Column("cache_hit", sa.Boolean, nullable=False),
        sa.Column("replay_of", sa.String(64)),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
        sa.Column("duration_ms", sa.Integer),
    )
    op.create_index(
        "ix_executions_tenant_started", "executions", ["tenant_id", "started_at"]
    )
    op.create_index(
        "ix_executions_tenant_request", "executions", ["tenant_id", "request_digest"]
    )
    op.create_index("ix_executions_result", "executions", ["result_digest"])
    op.create_table(
        "cas_ownership",
        _tenant_fk(primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "cost_records",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        _tenant_fk(),
        sa.Column("execution_id", sa.String(64)),
        sa.Column("units", MONEY, nullable=False),
        sa.Column("cost", MONEY, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index(
        "ix_cost_records_tenant_created", "cost_records", ["tenant_id", "created_at"]
    )
    op.create_table(
        "budgets",
        _tenant_fk(primary_key=True),
        sa.Column("limit_amount", MONEY, nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("updated_by", sa.String(128)),
    )
    op.create_table(
        "circuit_breakers",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failure_count", sa.Integer, nullable=False),
        sa.Column("opened_at", TZ),
        sa.Column("details", sa.Text),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("circuit_breakers")
    op.drop_table("budgets")
    op.drop_index("ix_cost_records_tenant_created", table_name="cost_records")
    op.drop_table("cost_records")
    op.drop_table("cas_ownership")
    op.drop_index("ix_executions_result", table_name="executions")
    op.drop_index("ix_executions_tenant_request", table_name="executions")
    op.drop_index("ix_executions_tenant_started", table_name="executions")
    op.drop_table("executions")
