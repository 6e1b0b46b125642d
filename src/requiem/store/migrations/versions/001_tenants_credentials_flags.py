"""Tenants, users and their credentials (API keys, JWT keys, revocations), flags.

Revision ID: 001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("suspended_reason", sa.String(256)),
        sa.Column("is_operator", sa.Boolean, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(64),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("email", sa.String(256), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(256)),
        sa.Column("force_password_reset", sa.Boolean, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )
    op.create_index("ix_users_tenant", "users", ["tenant_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(64),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="SET NULL")
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(128)),
        sa.Column("expires_at", TZ),
        sa.Column("revoked_at", TZ),
        sa.Column("last_used_at", TZ),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant_id"])
    op.create_table(
        "jwt_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_pem", sa.Text, nullable=False),
        sa.Column("private_pem", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("promoted_at", TZ),
        sa.Column("retired_at", TZ),
    )
    op.create_table(
        "token_revocations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("jti", sa.String(128)),
        sa.Column("user_id", sa.String(64)),
        sa.Column("revoked_before", TZ),
        sa.Column("reason", sa.String(256)),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_token_revocations_user", "token_revocations", ["user_id"])
    op.create_index("ix_token_revocations_jti", "token_revocations", ["jti"])
    op.create_table(
        "flags",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Boolean, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("updated_by", sa.String(128)),
    )


def downgrade() -> None:
    op.drop_table("flags")
    op.drop_index("ix_token_revocations_jti", table_name="token_revocations")
    op.drop_index("ix_token_revocations_user", table_name="token_revocations")
    op.drop_table("token_revocations")
    op.drop_table("jwt_keys")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_index("ix_users_tenant", table_name="users")
    op.drop_table("users")
    op.drop_table("tenants")
