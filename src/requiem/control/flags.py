"""Operational flags kept in the database, so every replica sees one value.

``execution_pause`` stops new executions (in-flight ones finish); ``maintenance``
closes every route except health, metrics and admin. A process reads them through a
:class:`FlagCache` that is at most one second old, so a change reaches every replica
within a second. Each change is audited with who, when, old and new value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from requiem.control import audit
from requiem.errors import NotFound, Unavailable
from requiem.store.models import Flag, utcnow

FLAGS: dict[str, str] = {
    "execution_pause": "New executions answer 503 execution_paused.",
    "maintenance": "Every route but health, metrics and admin answers 503.",
}
CACHE_TTL_S = 1.0


class UnknownFlag(NotFound):
    code = "unknown_flag"


class ExecutionPaused(Unavailable):
    code = "execution_paused"


class MaintenanceMode(Unavailable):
    code = "maintenance"


@dataclass(frozen=True)
class FlagState:
    name: str
    value: bool
    updated_at: datetime | None
    updated_by: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": self.value,
            "updated_at": _iso(self.updated_at),
            "updated_by": self.updated_by,
        }


def _iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes that were written as UTC."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def check_name(name: str) -> str:
    if name not in FLAGS:
        msg = f"unknown flag {name!r} (known: {', '.join(sorted(FLAGS))})"
        raise UnknownFlag(msg, flag=name)
    return name


def read(session: Session, name: str) -> FlagState:
    """The stored state of one flag; an unset flag is false."""
    check_name(name)
    row = session.get(Flag, name)
    if row is None:
        return FlagState(name, False, None, None)
    return FlagState(name, bool(row.value), row.updated_at, row.updated_by)


def read_all(session: Session) -> dict[str, bool]:
    values = dict.fromkeys(FLAGS, False)
    for row in session.scalars(select(Flag)):
        if row.name in values:
            values[row.name] = bool(row.value)
    return values


def write(
    session: Session,
    name: str,
    value: bool,
    *,
    actor: str | None,
    tenant_id: str | None = None,
    source: str = "api",
    request_id: str | None = None,
) -> tuple[bool, FlagState]:
    """Set a flag; returns the old value and the new state. Audited."""
    check_name(name)
    row = session.get(Flag, name, with_for_update=True)
    old = bool(row.value) if row is not None else False
    if row is None:
        row = Flag(name=name)
        session.add(row)
    row.value = value
    row.updated_at = utcnow()
    row.updated_by = actor

    audit.record(
        session,
        "flag.set",
        actor=actor,
        tenant_id=tenant_id,
        target=name,
        source=source,
        request_id=request_id,
        details={"old": old, "new": value},
    )
    return old, FlagState(name, value, row.updated_at, actor)


class FlagCache:
    """All flags as of at most ``ttl`` seconds ago; one caller refreshes at a time."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        ttl: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, bool] = dict.fromkeys(FLAGS, False)
        self._fetched_at = float("-inf")

    @property
    def fresh(self) -> bool:
        return self._clock() - self._fetched_at < self._ttl

    def values(self) -> dict[str, bool]:
        """Current flags; reads the database when the cached copy is stale."""
        if not self.fresh:
            with self._lock:
                if not self.fresh:
                    self.refresh()
        return dict(self._values)

    def cached(self) -> dict[str, bool]:
        """The last values read, without touching the database."""
        return dict(self._values)

    def refresh(self) -> None:
        with self._factory() as session:
            self._values = read_all(session)
        self._fetched_at = self._clock()

    def invalidate(self) -> None:
        self._fetched_at = float("-inf")
