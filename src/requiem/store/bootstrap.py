"""Bring a database to the current schema before the service or a command uses it."""

from __future__ import annotations

from sqlalchemy import Engine

from requiem import settings


def ensure_schema(engine: Engine) -> None:
    """Migrate ``engine``'s database to the newest revision (under the lock).

    Cheap when the database is already there: one query reads its revision. An
    in-memory SQLite database lives in one connection only, so it is migrated on
    that connection, without the lock or the run log.
    """
    from alembic import command  # Alembic loads only for commands that use the database

    from requiem.store import migrate, revisions

    with engine.connect() as conn:
        if revisions.current_revision(conn) == revisions.head():
            return
        if engine.url.get_backend_name() == "sqlite" and engine.url.database in (
            None,
            "",
            ":memory:",
        ):
            command.upgrade(revisions.alembic_config(connection=conn), "head")
            conn.commit()
            return
    migrate.Migrator(engine, settings.load(), source="service").upgrade()
