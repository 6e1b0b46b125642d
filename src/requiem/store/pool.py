"""Watching and steering a connection pool: status, drain, leaks, reset.

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
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        self._install_gate()

    def _install_gate(self) -> None:
        if hasattr(self.engine.pool, "gate"):
            self.engine.pool.gate = self._gate

    def _gate(self) -> None:
        if self._draining:
            msg = "the database pool is draining: no new connections are handed out"
            raise PoolDraining(msg)

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

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Refuse new checkouts, wait up to ``timeout_s`` for every connection back.

        Idle connections are closed once all are back. The pool stays closed to new
        checkouts (``pool_draining``) until :meth:`reset`.
        """
        self._draining = True
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            with self._lock:
                remaining = len(self._held)
            if remaining == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if remaining == 0:
            self.engine.pool.dispose()
        return {
            "drained": remaining == 0,
            "checked_out": remaining,
            "waited_s": round(time.monotonic() - started, 3),
            "holders": [] if remaining == 0 else self.leaks(0.0),
        }

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
        self._draining = False
        return self.status()
