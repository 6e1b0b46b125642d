"""Database engines and sessions, chosen by ``DATABASE_URL``.

SQLite (the embedded default) runs in WAL mode with a busy timeout so several
processes can share one file; PostgreSQL gets a real pool sized from settings and is
reached through psycopg 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from requiem.errors import ConfigError
from requiem.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3; anything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return normalise_url(url).startswith("sqlite")


def make_engine(settings: Settings, url: str | None = None) -> Engine:
    """An engine for ``url`` (default: the configured database)."""
    raw = url or settings.database_url
    try:
        parsed = make_url(normalise_url(raw))
    except ArgumentError as exc:
        msg = "DATABASE_URL is malformed (expected postgresql://… or sqlite:///…)"
        raise ConfigError(msg) from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() != "postgresql":
        backend = parsed.get_backend_name()
        msg = f"unsupported database {backend!r}: use PostgreSQL or SQLite"
        raise ConfigError(msg)
    return create_engine(
        parsed,
        pool_size=settings.int("REQUIEM_DB_POOL_SIZE"),
        max_overflow=settings.int("REQUIEM_DB_MAX_OVERFLOW"),
        pool_timeout=settings.float("REQUIEM_DB_POOL_TIMEOUT"),
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5},
    )


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session
