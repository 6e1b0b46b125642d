"""Database engines and sessions, chosen by ``DATABASE_URL``.

SQLite (the embedded default) runs in WAL mode with a busy timeout so several
processes can share one file; PostgreSQL is reached through psycopg 3 with a statement
timeout. Both get a pool sized from settings that counts its waiters (``db pool``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

from requiem.errors import ConfigError, RequiemError
from requiem.settings import Settings
from requiem.store.errors import DatabaseAuthFailed, DatabaseUnreachable

SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 5
_AUTH_FAILURES = (
    "password authentication failed",
    'role "',  # role "x" does not exist
    "no password supplied",
    "authentication failed",
)


class CountingQueuePool(QueuePool):
    """A QueuePool that knows how many callers are waiting for a connection.

    SQLAlchemy's pool events fire only once a connection has been handed out, so the
    number of waiters (what ``db pool status`` reports) is counted around ``_do_get``,
    the documented override point of pool subclasses. ``gate`` is called first, so a
    draining pool refuses before anyone queues.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.waiters = 0
        self.gate = None

    def _do_get(self):  # noqa: ANN202
        if self.gate is not None:
            self.gate()
        self.waiters += 1
        try:
            return super()._do_get()
        finally:
            self.waiters -= 1


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3; anything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return normalise_url(url).startswith("sqlite")


def parse_url(raw: str) -> URL:
    """The SQLAlchemy URL of ``raw``; ConfigError when malformed or not supported."""
    try:
        parsed = make_url(normalise_url(raw))
    except (ArgumentError, ValueError) as exc:
        msg = "DATABASE_URL is malformed (expected postgresql://… or sqlite:///…)"
        raise ConfigError(msg) from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        msg = f"unsupported database {backend!r}: use PostgreSQL or SQLite"
        raise ConfigError(msg)
    return parsed


def masked(raw: str | URL) -> str:
    """The URL with its password replaced by ``***`` (for people to read)."""
    try:
        url = raw if isinstance(raw, URL) else parse_url(raw)
    except ConfigError:
        return "<malformed>"
    shown = url.set(drivername=url.get_backend_name())
    return shown.render_as_string(hide_password=True)


def make_engine(settings: Settings, url: str | None = None) -> Engine:
    """An engine for ``url`` (default: the configured database)."""
    parsed = parse_url(url or settings.database_url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **_pool_options(settings),
        )
        event.listen(engine, "connect", _sqlite_pragmas(SQLITE_BUSY_TIMEOUT_MS))
        return engine
    statement_ms = settings.int("REQUIEM_DB_STATEMENT_TIMEOUT_MS")
    return create_engine(
        parsed,
        pool_pre_ping=True,
        **_pool_options(settings),
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "requiem",
            "options": f"-c statement_timeout={statement_ms}",
        },
    )


def _pool_options(settings: Settings) -> dict[str, object]:
    return {
        "poolclass": CountingQueuePool,
        "pool_size": settings.int("REQUIEM_DB_POOL_SIZE"),
        "max_overflow": settings.int("REQUIEM_DB_MAX_OVERFLOW"),
        "pool_timeout": settings.float("REQUIEM_DB_POOL_TIMEOUT"),
    }


def migration_engine(engine: Engine, timeout_s: float | None = None) -> Engine:
    """A one-connection engine on ``engine``'s database for running migrations.

    On SQLite every transaction is ``BEGIN IMMEDIATE`` and DDL is transactional: the
    sqlite3 module otherwise commits before each CREATE/DROP, so a killed migration
    would leave half a revision behind. On PostgreSQL ``timeout_s`` bounds both lock
    waits and statements (``lock_timeout``, ``statement_timeout``).
    """
    url = engine.url
    if url.get_backend_name() == "sqlite":
        busy_ms = int(timeout_s * 1000) if timeout_s else SQLITE_BUSY_TIMEOUT_MS
        runner = create_engine(
            url, poolclass=NullPool, connect_args={"timeout": busy_ms / 1000}
        )
        event.listen(runner, "connect", _sqlite_pragmas(busy_ms, autocommit=True))
        event.listen(
            runner, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
        )
        return runner
    limit_ms = int(timeout_s * 1000) if timeout_s else 0
    return create_engine(
        url,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "requiem-migrate",
            "options": f"-c lock_timeout={limit_ms} -c statement_timeout={limit_ms}",
        },
    )


def _sqlite_pragmas(busy_ms: int, autocommit: bool = False):  # noqa: ANN202
    def on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        if autocommit:
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def connection_error(exc: DBAPIError, url: URL) -> RequiemError:
    """The user-facing error for a failure to reach or log in to the database."""
    reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    where = masked(url)
    if url.get_backend_name() != "sqlite" and any(
        marker in reason for marker in _AUTH_FAILURES
    ):
        return DatabaseAuthFailed(f"database refused the login at {where}: {reason}")
    return DatabaseUnreachable(f"database unreachable at {where}: {reason}")


@contextmanager
def connected(engine: Engine) -> Iterator[Connection]:
    """``engine.connect()`` with a failure to connect as a one-line RequiemError."""
    try:
        conn = engine.connect()
    except DBAPIError as exc:
        raise connection_error(exc, engine.url) from exc
    with conn:
        yield conn


def ping(engine: Engine) -> dict[str, float]:
    """Milliseconds to connect and for one ``SELECT 1`` round trip."""
    started = time.perf_counter()
    with connected(engine) as conn:
        connect_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        conn.execute(text("SELECT 1")).scalar_one()
        round_trip_ms = (time.perf_counter() - started) * 1000
    return {
        "connect_ms": round(connect_ms, 3),
        "round_trip_ms": round(round_trip_ms, 3),
    }


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session
