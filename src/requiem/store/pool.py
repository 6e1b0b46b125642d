"""Watching and steering a connection pool: status, drain, leaks, reset.

A drain never strands work the server already accepted: requests in flight when it
starts (``in_flight``, by request id) may still check out connections to record
their results, and so may the server's own threads (no request id: the group-commit
writer, the audit flusher) while any such request is unfinished. Everyone else gets
``pool_draining``.

``PoolMonitor(engine)`` listens to the engine's pool events. Each checkout is noted
with when, by which thread, from which code (a short stack summary) and for which
request (``current_request_id``, a context variable the HTTP layer sets), so a
connection held too long can be traced to what took it. The admin routes
``/api/admin/db/pool…`` and ``requiem db pool …`` show what these methods return.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, event

from requiem.store.errors import PoolDraining

current_request_id: ContextVar[str | None] = ContextVar(
    "requiem_current_request_id", default=None
)
STACK_FRAMES = 8
_SKIPPED = ("/sqlalchemy/", "/requiem/store/pool.py", "/contextlib.py")


@dataclass(frozen=True)
class _Checkout:
    started: float  # time.monotonic()
    at: datetime
    thread: str
    request_id: str | None
    stack: tuple[str, ...]


def _caller_stack() -> tuple[str, ...]:
    """The innermost frames outside SQLAlchemy and this module, innermost last.

    Walks frames by hand: ``traceback.extract_stack`` costs several times more, and
    this runs on every checkout.
    """
    frames: list[str] = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < STACK_FRAMES:
        code = frame.f_code
        if not any(part in code.co_filename for part in _SKIPPED):
            frames.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return tuple(reversed(frames))


class PoolMonitor:
    """Status, drain, leak report and reset of ``engine``'s connection pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._held: dict[int, _Checkout] = {}
        self._checkouts_total = 0
        self._draining = False
        self._admitted: Counter[str] = Counter()
        self._internal_open = False
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        self._install_gate()

    def _install_gate(self) -> None:
        if hasattr(self.engine.pool, "gate"):
            self.engine.pool.gate = self._gate

    def _gate(self) -> None:
        if not self._draining:
            return
        request_id = current_request_id.get()
        with self._lock:
            if request_id is None:
                allowed = self._internal_open or bool(self._admitted)
            else:
                allowed = self._admitted[request_id] > 0
        if not allowed:
            msg = "the database pool is draining: no new connections are handed out"
            raise PoolDraining(msg)

    def finished(self, request_id: str) -> None:
        """A request admitted before a drain is done: it needs no more connections."""
        if not self._admitted:
            return
        with self._lock:
            if self._admitted[request_id] > 0:
                self._admitted[request_id] -= 1
            if self._admitted[request_id] <= 0:
                del self._admitted[request_id]

    def _on_checkout(self, _dbapi: Any, record: Any, _proxy: Any) -> None:
        self._gate()  # pools without a gate refuse here instead
        entry = _Checkout(
            started=time.monotonic(),
            at=datetime.now(UTC),
            thread=threading.current_thread().name,
            request_id=current_request_id.get(),
            stack=_caller_stack(),
        )
        with self._lock:
            self._held[id(record)] = entry
            self._checkouts_total += 1

    def _on_checkin(self, _dbapi: Any, record: Any) -> None:
        with self._lock:
            self._held.pop(id(record), None)

    @property
    def draining(self) -> bool:
        return self._draining

    def status(self) -> dict[str, Any]:
        """Size, checked out, overflow, waiters, checkouts since start, draining."""
        pool = self.engine.pool
        size = pool.size() if hasattr(pool, "size") else 0
        with self._lock:
            held = len(self._held)
            total = self._checkouts_total
        return {
            "pool": type(pool).__name__,
            "size": size,
            "checked_out": held,
            "checked_in": pool.checkedin() if hasattr(pool, "checkedin") else 0,
            "overflow": max(pool.overflow(), 0) if hasattr(pool, "overflow") else 0,
            "max_overflow": getattr(pool, "_max_overflow", 0),
            "timeout_s": pool.timeout() if hasattr(pool, "timeout") else None,
            "waiters": getattr(pool, "waiters", 0),
            "checkouts_total": total,
            "draining": self._draining,
        }

    def drain(
        self,
        timeout_s: float,
        in_flight: Iterable[str] = (),
        before_close: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Refuse new checkouts, let admitted work finish, wait for every connection.

        ``in_flight`` are the ids of requests accepted before the drain: they keep
        checking out until :meth:`finished` is called for each, within ``timeout_s``
        or after it. Once they are done (or the time is up) ``before_close`` runs,
        still allowed to use the pool (the server stops its audit flusher there);
        then only admitted work still running may check out. Idle connections are
        closed once all are back. The pool stays closed to new checkouts
        (``pool_draining``) until :meth:`reset`.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        with self._lock:
            self._admitted = Counter(in_flight)
            self._internal_open = True
            self._draining = True
        self._wait(deadline, lambda: not self._admitted)
        if before_close is not None:
            token = current_request_id.set(None)
            try:
                before_close()
            finally:
                current_request_id.reset(token)
        with self._lock:
            self._internal_open = False
        self._wait(deadline, lambda: not self._admitted and not self._held)
        with self._lock:
            remaining, unfinished = len(self._held), sum(self._admitted.values())
        drained = remaining == 0 and unfinished == 0
        if drained:
            self.engine.pool.dispose()
        return {
            "drained": drained,
            "checked_out": remaining,
            "in_flight": unfinished,
            "waited_s": round(time.monotonic() - started, 3),
            "holders": [] if remaining == 0 else self.leaks(0.0),
        }

    def _wait(self, deadline: float, done: Callable[[], bool]) -> None:
        while True:
            with self._lock:
                if done():
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def leaks(self, threshold_s: float) -> list[dict[str, Any]]:
        """Connections held longer than ``threshold_s``, longest first."""
        now = time.monotonic()
        with self._lock:
            held = list(self._held.values())
        found = [
            {
                "held_s": round(now - entry.started, 3),
                "since": entry.at.isoformat(),
                "thread": entry.thread,
                "request_id": entry.request_id,
                "stack": list(entry.stack),
            }
            for entry in held
            if now - entry.started >= threshold_s
        ]
        return sorted(found, key=lambda leak: leak["held_s"], reverse=True)

    def reset(self) -> dict[str, Any]:
        """Close every pooled connection, start a fresh pool, accept checkouts again.

        Connections checked out now stay valid until returned, then are closed.
        """
        self.engine.dispose()
        self._install_gate()
        with self._lock:
            self._draining = False
            self._internal_open = False
            self._admitted.clear()
        return self.status()
