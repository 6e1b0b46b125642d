"""What one server process holds: database, CAS, flag and key caches, health, limits.

The app keeps one :class:`Service` in ``app.state.service``; routes reach it through
:func:`get_service`. Everything here is safe to use from the event loop and from
worker threads at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
from fastapi import Request
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from requiem import __version__, log
from requiem.api import metrics
from requiem.cas.store import LocalCAS
from requiem.control import audit, credentials
from requiem.control.credentials import Principal
from requiem.control.executions import ExecutionService
from requiem.control.flags import FlagCache
from requiem.engine import Engine
from requiem.errors import RequiemError, TooManyRequests
from requiem.settings import Settings
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory
from requiem.store.pool import PoolMonitor, current_request_id

logger = log.get("requiem.api")

KEY_CACHE_TTL_S = 1.0
KEY_CACHE_MAX = 10_000
HEALTH_TTL_S = 1.0

# Set by the server on SIGTERM: every Service of the process starts draining.
SHUTDOWN = threading.Event()
_LIVE: weakref.WeakSet[Service] = weakref.WeakSet()


def busy() -> bool:
    """Whether any service of this process is answering or running something."""
    return any(service.busy for service in list(_LIVE))


class ExecutionQueueFull(TooManyRequests):
    code = "execution_queue_full"


class KeyCache:
    """Recently verified keys by HMAC, at most one second old.

    Revoking a key therefore takes effect on every replica within a second, and a
    busy client costs one database read per second instead of one per request.
    Failures are never cached, so each one is checked and audited.
    """

    def __init__(self, ttl: float = KEY_CACHE_TTL_S) -> None:
        self._ttl = ttl
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None or time.monotonic() - entry[1] >= self._ttl:
            return None
        return entry[0]

    def put(self, key_hash: str, principal: Principal) -> None:
        if len(self._entries) >= KEY_CACHE_MAX:
            self._entries.clear()
        self._entries[key_hash] = (principal, time.monotonic())

    def clear(self) -> None:
        self._entries.clear()


class ExecutionLimiter:
    """At most ``slots`` executions at once; a caller waits up to ``queue_timeout_s``.

    A caller still waiting when the time runs out gets 429 ``execution_queue_full``
    with ``Retry-After``, so load beyond capacity is shed instead of piling up.
    """

    def __init__(self, slots: int, queue_timeout_s: float) -> None:
        self.slots = max(1, slots)
        self.queue_timeout_s = queue_timeout_s
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> None:
        from requiem.api import metrics

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A semaphore belongs to one event loop; a new loop (a restarted
            # test client) starts with every slot free.
            self._semaphore, self._loop = asyncio.Semaphore(self.slots), loop
        semaphore = self._semaphore
        self.waiting += 1
        metrics.EXECUTIONS_QUEUED.inc()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await semaphore.acquire()
        except TimeoutError as exc:
            msg = (
                f"all {self.slots} execution slots stayed busy for "
                f"{self.queue_timeout_s:g} s; retry later"
            )
            raise ExecutionQueueFull(msg, retry_after_s=1) from exc
        finally:
            self.waiting -= 1
            metrics.EXECUTIONS_QUEUED.dec()
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        if self._semaphore is not None:
            self._semaphore.release()


class Service:
    """The resources of one server process, created by ``create_app``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = make_engine(settings)
        self.sessions = session_factory(self.db)
        self.cas = LocalCAS.from_settings(settings)
        self.flags = FlagCache(self.sessions)
        self.keys = KeyCache()
        self.limiter = ExecutionLimiter(
            settings.int("REQUIEM_MAX_CONCURRENT_EXECUTIONS"),
            settings.int("REQUIEM_QUEUE_TIMEOUT_MS") / 1000,
        )
        self.max_body_bytes = settings.int("REQUIEM_MAX_BODY_BYTES")
        self.secret_key = settings.secret_key
        self._draining = False
        self.started_at = time.time()
        self.audit_service: Any = None
        self.pool = PoolMonitor(self.db)
        self._side_db: SqlEngine | None = None
        self.active_requests = 0
        self._in_flight: Counter[str] = Counter()
        self._in_flight_lock = threading.Lock()
        self._audit_paused = False
        self.engine = Engine(self.cas, settings)
        self.executions = ExecutionService(
            self.sessions,
            self.cas,
            self.engine,
            Decimal(str(settings.get("REQUIEM_COST_PER_SECOND"))),
        )
        self._health: dict[str, Any] | None = None
        self._health_at = float("-inf")
        self._health_lock = threading.Lock()
        _LIVE.add(self)

    @property
    def draining(self) -> bool:
        return self._draining or SHUTDOWN.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Bring the database schema and the CAS directory up; start helpers."""
        ensure_schema(self.db)
        self.cas.ensure()
        self.flags.refresh()
        self.audit_service = audit.AuditService(self.sessions, self.settings)
        self.audit_service.start()
        logger.info("service_started", version=__version__)

    def stop(self) -> None:
        """Flush what is buffered, drain the pool, release the database.

        After ``db pool drain`` the pool is closed; it is reopened for this last
        flush (one log line says so) so pending audit entries are linked, not lost.
        """
        self.executions.writer.close()
        if self.pool.draining:
            logger.info("pool_reopened_for_final_flush")
            self.pool.reset()
        if self.audit_service is not None:
            try:
                self.audit_service.stop()
            except Exception as exc:  # noqa: BLE001 - entries stay in audit_pending
                logger.warning(
                    "final_audit_flush_skipped",
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                )
        self.pool.drain(self.settings.float("REQUIEM_SHUTDOWN_GRACE_S"))
        self.db.dispose()
        if self._side_db is not None:
            self._side_db.dispose()
        logger.info("service_stopped")

    @property
    def busy(self) -> bool:
        """Requests being answered or executions running or waiting for a slot."""
        return bool(
            self.active_requests or self.limiter.running or self.limiter.waiting
        )

    # -- requests in flight and the pool -------------------------------------------

    def request_started(self, request_id: str) -> None:
        with self._in_flight_lock:
            self._in_flight[request_id] += 1

    def request_finished(self, request_id: str) -> None:
        with self._in_flight_lock:
            self._in_flight[request_id] -= 1
            if self._in_flight[request_id] <= 0:
                del self._in_flight[request_id]
        self.pool.finished(request_id)

    def drain_pool(self, timeout_s: float) -> dict[str, Any]:
        """Drain the pool without losing accepted work (``db pool drain``).

        Requests in flight now (except the caller's own) may still record their
        results; once they are done the audit flusher is stopped after a last
        flush, so a drained pool is quiet. :meth:`reset_pool` starts it again.
        """
        with self._in_flight_lock:
            in_flight = Counter(self._in_flight)
        own = current_request_id.get()
        if own is not None and in_flight[own] > 0:
            in_flight[own] -= 1
        return self.pool.drain(
            timeout_s, in_flight.elements(), before_close=self._pause_audit
        )

    def reset_pool(self) -> dict[str, Any]:
        """Reopen the pool and restart the audit flusher a drain paused."""
        state = self.pool.reset()
        if self._audit_paused and self.audit_service is not None:
            self.audit_service.start()
            self._audit_paused = False
        return state

    def _pause_audit(self) -> None:
        if self.audit_service is None or self._audit_paused:
            return
        self._audit_paused = True
        try:
            report = self.audit_service.stop()
        except Exception as exc:  # noqa: BLE001 - entries stay in audit_pending
            logger.warning(
                "audit_flush_before_drain_failed",
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )
            return
        logger.info("audit_flusher_paused_for_drain", linked=report.linked)

    def status(self) -> dict[str, Any]:
        """This process's load and switches, for ``requiem status``."""
        return {
            "version": __version__,
            "draining": self.draining,
            "flags": self.flags.values(),
            "active_requests": self.active_requests,
            "executions_running": self.limiter.running,
            "executions_queued": self.limiter.waiting,
            "execution_slots": self.limiter.slots,
            "pool": self.pool.status(),
        }

    def cas_totals(self) -> tuple[int, int]:
        """Number of objects in the CAS and their logical bytes (walks the tree)."""
        objects = size = 0
        for digest in self.cas.iter_digests():
            try:
                size += self.cas.meta(digest).size
            except RequiemError:
                continue
            objects += 1
        return objects, size

    # -- authentication ----------------------------------------------------------

    def authenticate(
        self, presented: str, request_id: str | None, source_ip: str | None
    ) -> Principal:
        """The principal for ``presented``; a failure is audited and raised."""
        key_hash = credentials.hash_key(self.secret_key, presented)
        cached = self.keys.get(key_hash)
        if cached is not None:
            return cached
        try:
            with self._auth_sessions()() as session:
                principal = credentials.authenticate(
                    session, self.secret_key, presented
                )
        except RequiemError as exc:
            self.audit_failed_auth(exc, request_id, source_ip)
            raise
        self.keys.put(key_hash, principal)
        return principal

    def _auth_sessions(self) -> sessionmaker[Session]:
        """The pool's sessions, or unpooled ones while the pool is drained.

        A drained pool hands out no connection, yet an admin must still be able to
        authenticate to reset it; keys are then checked over a one-off connection.
        """
        if not self.pool.draining:
            return self.sessions
        return session_factory(self._side_engine())

    def _side_engine(self) -> SqlEngine:
        if self._side_db is None:
            self._side_db = create_engine(self.db.url, poolclass=NullPool)
        return self._side_db

    def audit_failed_auth(
        self, exc: RequiemError, request_id: str | None, source_ip: str | None
    ) -> None:
        details = {"reason": exc.code, "source_ip": source_ip}
        if "key_id" in exc.details:
            details["key_id"] = exc.details["key_id"]
        self.executions.writer.write(
            lambda session: audit.record(
                session,
                "auth.failure",
                actor=None,
                target=exc.details.get("key_id"),
                outcome="failure",
                source="api",
                request_id=request_id,
                details=details,
            )
        )

    # -- health ------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The health document, recomputed at most once a second.

        A drained pool makes the process not ready (status ``draining``) — it can
        serve nothing — while the database check still probes the database over a
        one-off connection, so ``requiem_database_up`` stays true to the database.
        """
        if time.monotonic() - self._health_at >= HEALTH_TTL_S:
            await anyio.to_thread.run_sync(self.refresh_health)
        assert self._health is not None
        document = dict(self._health)
        if self.draining or self.pool.draining:
            document["status"] = "draining"
            document["ready"] = False
        return document

    def refresh_health(self) -> None:
        """Run the checks unless the last run is under a second old."""
        with self._health_lock:
            if time.monotonic() - self._health_at < HEALTH_TTL_S:
                return
            checks = {
                "database": _check(self._check_database),
                "cas": _check(self._check_cas),
                "engine": _check(self._check_engine),
                "sandbox": _check(self._check_sandbox),
                "flags": _check(self._check_flags),
            }
            ready = all(c["ok"] for c in checks.values() if c.get("required", True))
            self._health = {
                "status": "ok" if ready else "degraded",
                "ready": ready,
                "live": True,
                "version": __version__,
                "uptime_s": round(time.time() - self.started_at, 3),
                "checks": checks,
            }
            self._health_at = time.monotonic()
            metrics.DATABASE_UP.set(1 if checks["database"]["ok"] else 0)

    def _check_database(self) -> dict[str, Any]:
        engine = self._side_engine() if self.pool.draining else self.db
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"backend": self.db.dialect.name}

    def _check_cas(self) -> dict[str, Any]:
        self.cas.ensure()
        return {"root": str(self.cas.root), "free_bytes": self.cas.disk_free()}

    def _check_engine(self) -> dict[str, Any]:
        caps = self.engine.capabilities()
        return {
            "faketime": caps.faketime_works,
            "rlimits": caps.rlimits,
            "work_dir": str(self.engine.work_dir),
        }

    def _check_sandbox(self) -> dict[str, Any]:
        caps = self.engine.capabilities()
        # Without bubblewrap executions still run, unsandboxed and reported so
        # in each result's sandbox_applied; strict-mode requests are refused.
        return {"bwrap": caps.bwrap_path, "works": caps.bwrap_works, "required": False}

    def _check_flags(self) -> dict[str, Any]:
        return {"values": self.flags.values()}


def _check(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = probe()
    except Exception as exc:  # noqa: BLE001 - a failed probe is a health answer
        required = True
        return {
            "ok": False,
            "required": required,
            "error": f"{type(exc).__name__}: {str(exc)[:200]}",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    result.setdefault("required", True)
    return {
        "ok": True,
        **result,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def get_service(request: Request) -> Service:
    return request.app.state.service
