"""Alembic environment of Requiem's schema.

``requiem.store.migrate`` drives it: it hands over an open connection (online) or a
URL and an output stream (offline, for ``db migrate --dry-run``) through
``config.attributes``, plus the callback that records each applied revision. Each
revision runs in its own transaction, so a failure stops the run with every earlier
revision kept and the failing one rolled back.
"""

from __future__ import annotations

from alembic import context

from requiem.store.models import Base

config = context.config
attributes = config.attributes


def run_offline() -> None:
    context.configure(
        url=attributes["url"],
        target_metadata=Base.metadata,
        literal_binds=True,
        transaction_per_migration=True,
        output_buffer=attributes["output"],
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        transaction_per_migration=True,
        render_as_batch=connection.dialect.name == "sqlite",
        on_version_apply=attributes.get("on_version_apply", ()),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
