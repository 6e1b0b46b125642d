"""Index CAS ownership by digest: "who owns this object" without a tenant.

Garbage collection and the CAS export ask which tenants hold a digest; the primary key
(tenant_id, digest) cannot answer that without a full scan.

Revision ID: 004
Revises: 003
"""

from __future__ import annotations

from alembic import op

revision = "004"
down_revision = "003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cas_ownership_digest", "cas_ownership", ["digest"])


def downgrade() -> None:
    op.drop_index("ix_cas_ownership_digest", table_name="cas_ownership")
