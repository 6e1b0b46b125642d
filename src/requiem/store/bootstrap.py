"""Bring a database to the current schema before the service or a command uses it."""

from __future__ import annotations

from sqlalchemy import Engine

from requiem import settings
from requiem.store.errors import DatabaseRevisionUnknown, SchemaNotCurrent


def ensure_schema(engine: Engine) -> None:
    """Make sure ``engine``'s database is at the newest revision before it is used.

    A new, empty database is migrated to head at once (under the lock), so the first
    command on a fresh machine just works. A database at an older revision is left
    alone and refused with ``schema_not_current``: it was rolled back on purpose, or
    the code was upgraded, and either way moving it is the operator's decision
    (``requiem db migrate``), taken with the runbook's dry run and backup first.

    Cheap when the database is already there: one query reads its revision. An
    in-memory SQLite database lives in one connection only, so it is migrated on
    that connection, without the lock or the run log.
    """
    from alembic import command  # Alembic loads only for commands that use the database

    from requiem.store import migrate, revisions

    with engine.connect() as conn:
        current = revisions.current_revision(conn)
        if current == revisions.head():
            return
        if current is not None:
            if current not in revisions.chain():
                msg = (
                    f"the database is at revision {current}, which this Requiem "
                    f"does not know (newest here: {revisions.head()})"
                )
                raise DatabaseRevisionUnknown(msg, current=current)
            msg = (
                f"the database is at revision {current} but this Requiem needs "
                f"{revisions.head()}: run `requiem db migrate` (see `db status`)"
            )
            raise SchemaNotCurrent(msg, current=current, head=revisions.head())
        if engine.url.get_backend_name() == "sqlite" and engine.url.database in (
            None,
            "",
            ":memory:",
        ):
            command.upgrade(revisions.alembic_config(connection=conn), "head")
            conn.commit()
            return
    migrate.Migrator(engine, settings.load(), source="service").upgrade()
