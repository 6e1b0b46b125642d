"""The audit log: chained entries, durable pending entries, signed checkpoints.

Revision ID: 003
Revises: 002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "003"
down_revision = "002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", BIG_ID, primary_key=True, autoincrement=False),
        sa.Column("ts", TZ, nullable=False),
        sa.Column("actor", sa.String(128)),
        sa.Column("tenant_id", sa.String(64)),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64)),
        sa.Column("request_id", sa.String(64)),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_index("ix_audit_tenant_ts", "audit_entries", ["tenant_id", "ts"])
    op.create_index("ix_audit_actor_ts", "audit_entries", ["actor", "ts"])
    op.create_index("ix_audit_action_ts", "audit_entries", ["action", "ts"])
    op.create_index("ix_audit_ts", "audit_entries", ["ts"])
    op.create_table(
        "audit_pending",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", BIG_ID, primary_key=True, autoincrement=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("signed_at", TZ, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(256), nullable=False),
    )
    op.create_table(
        "audit_runs",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("count", BIG_ID, nullable=False),
        sa.Column("head_seq", BIG_ID, nullable=False),
        sa.Column("first_bad_seq", BIG_ID),
        sa.Column("damage", sa.String(32)),
        sa.Column("message", sa.String(512)),
    )


def downgrade() -> None:
    op.drop_table("audit_runs")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_pending")
    for name in (
        "ix_audit_ts",
        "ix_audit_action_ts",
        "ix_audit_actor_ts",
        "ix_audit_tenant_ts",
    ):
        op.drop_index(name, table_name="audit_entries")
    op.drop_table("audit_entries")
