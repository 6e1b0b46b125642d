"""The migration lock: one migrating process per database at a time.

On PostgreSQL the lock is a session-level advisory lock, released by the server when
the holding session ends (even after ``kill -9``). On SQLite it is a row in
``requiem_migration_lock``; a row whose holder is a dead process on this host is
stale and is taken over. On both, the row says who holds the lock, where and since
when, so ``db locks`` can tell an operator.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, inspect, select, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from requiem import log
from requiem.store.errors import MigrationLocked
from requiem.store.history import BOOKKEEPING, Caller, lock_table
from requiem.store.models import utcnow

# The advisory lock key: the bytes "requiem" and a version byte, as a bigint.
ADVISORY_KEY = int.from_bytes(b"requiem\x01", "big")
POLL_S = 0.2

logger = log.get("requiem.store.lock")


def pid_alive(host: str, pid: int) -> bool | None:
    """Whether ``pid`` runs on ``host``; None when ``host`` is another machine."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockState:
    """The migration lock as seen now."""

    held: bool
    holder: dict[str, Any] | None  # the lock row: actor, host, pid, command, since
    holder_alive: bool | None  # None: on another host, cannot tell
    backend_pid: int | None  # PostgreSQL session holding the advisory lock

    @property
    def age_s(self) -> float | None:
        """Seconds since the holder took the lock."""
        if self.holder is None:
            return None
        since = self.holder["acquired_at"]
        now = utcnow() if since.tzinfo else utcnow().replace(tzinfo=None)
        return (now - since).total_seconds()

    @property
    def stale(self) -> bool:
        return self.holder is not None and not self.held

    def describe(self) -> str:
        if self.holder is None:
            return "no migration lock is held"
        who = self.holder
        since = who["acquired_at"]
        text_ = (
            f"{who['command']} by {who['actor']} on {who['host']} pid {who['pid']}"
            f" since {since.isoformat() if isinstance(since, datetime) else since}"
        )
        if self.stale:
            return f"stale lock left by {text_} (the holder is gone)"
        return f"held by {text_}"


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _row(conn: Connection) -> dict[str, Any] | None:
    if not inspect(conn).has_table(lock_table.name):
        return None
    row = conn.execute(select(lock_table)).mappings().first()
    return dict(row) if row else None


def _advisory_holder(conn: Connection) -> int | None:
    high, low = ADVISORY_KEY >> 32, ADVISORY_KEY & 0xFFFFFFFF
    return conn.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = :high AND objid = :low AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database"
            "                 WHERE datname = current_database())"
        ),
        {"high": high, "low": low},
    ).scalar()


def read(conn: Connection) -> LockState:
    """The lock's current state (reads only)."""
    row = _row(conn)
    alive = pid_alive(row["host"], row["pid"]) if row else None
    if is_postgres(conn):
        backend = _advisory_holder(conn)
        return LockState(backend is not None, row, alive, backend)
    return LockState(row is not None and alive is not False, row, alive, None)


class MigrationLock:
    """Held by one connection for the length of a migration run."""

    def __init__(self, conn: Connection, caller: Caller, command: str) -> None:
        self.conn = conn
        self.caller = caller
        self.command = command

    def acquire(self, wait_s: float) -> None:
        """Take the lock, waiting up to ``wait_s``; MigrationLocked if still held."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._try():
                    return
            except OperationalError as exc:  # SQLite busy beyond the busy timeout
                self.conn.rollback()
                if time.monotonic() >= deadline:
                    msg = f"the database stayed busy for {wait_s:g}s: {exc.orig}"
                    raise MigrationLocked(msg) from exc
            if time.monotonic() >= deadline:
                state = read(self.conn)
                self.conn.rollback()
                msg = (
                    f"migration lock {state.describe()}; gave up after {wait_s:g}s"
                    " (see `requiem db locks`)"
                )
                raise MigrationLocked(msg)
            time.sleep(POLL_S)

    def _try(self) -> bool:
        conn = self.conn
        if is_postgres(conn):
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}
            ).scalar_one()
            conn.commit()
            if not got:
                return False
        with conn.begin():
            BOOKKEEPING.create_all(conn, checkfirst=True)
            row = _row(conn)
            if row is not None and not is_postgres(conn):
                if pid_alive(row["host"], row["pid"]) is not False:
                    return False
            if row is not None:
                logger.warning("migration_lock_taken_over", stale_holder=plain(row))
                conn.execute(delete(lock_table))
            conn.execute(
                insert(lock_table).values(
                    id=1,
                    actor=self.caller.actor,
                    host=self.caller.host,
                    pid=self.caller.pid,
                    command=self.command,
                    acquired_at=utcnow(),
                )
            )
        return True

    def release(self) -> None:
        """Give the lock back; a lost connection has already released it."""
        conn = self.conn
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                conn.execute(
                    delete(lock_table).where(
                        lock_table.c.pid == self.caller.pid,
                        lock_table.c.host == self.caller.host,
                    )
                )
            if is_postgres(conn):
                conn.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY}
                )
                conn.commit()
        except SQLAlchemyError as exc:
            logger.warning(
                "migration_lock_release_failed",
                error=str(getattr(exc, "orig", None) or exc),
            )


def force_release(conn: Connection) -> LockState:
    """Remove the lock whoever holds it; on PostgreSQL end the holding session."""
    state = read(conn)
    if state.backend_pid is not None:
        conn.execute(
            text("SELECT pg_terminate_backend(:pid)"), {"pid": state.backend_pid}
        )
    if state.holder is not None:
        conn.execute(delete(lock_table))
    conn.commit()
    return state


def blocking_sessions(conn: Connection) -> list[dict[str, Any]]:
    """PostgreSQL sessions of this database that wait on another's lock."""
    rows = conn.execute(
        text(
            "SELECT a.pid, a.usename AS user, a.application_name AS application,"
            " a.state, pg_blocking_pids(a.pid) AS blocked_by,"
            " extract(epoch FROM now() - a.query_start) AS waiting_s,"
            " left(a.query, 200) AS query"
            " FROM pg_stat_activity a"
            " WHERE a.datname = current_database()"
            " AND cardinality(pg_blocking_pids(a.pid)) > 0"
            " ORDER BY a.query_start"
        )
    ).mappings()
    return [dict(row) for row in rows]


def plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """``row`` with its times as ISO text, ready for JSON and the audit log."""
    if row is None:
        return None
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
    }
