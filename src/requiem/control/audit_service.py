"""The server's audit flusher: group commit of pending entries into the chain.

Every state change commits its audit entry to ``audit_pending`` with the change, so
an acknowledged action is never lost. Linking those rows into the hash chain one by
one would serialise every request on the chain's head; instead a background thread
links whatever is pending every ``interval_s`` (100 ms), in batches, and signs
checkpoints when they fall due. ``lag`` — the age of the oldest pending entry — is
what the runbook's P2 alert watches (above 1 s).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from requiem import log
from requiem.control import audit_chain, audit_verify, audit_verify_parallel
from requiem.control.audit_chain import LinkReport
from requiem.control.audit_keys import AuditSigner, Checkpoint
from requiem.control.audit_verify import VerifyReport
from requiem.settings import Settings
from requiem.store.models import AuditRun

logger = log.get("requiem.audit")

PENDING = Gauge("requiem_audit_pending", "Audit entries durable but not yet chained.")
LAG = Gauge(
    "requiem_audit_lag_seconds", "Age in seconds of the oldest pending audit entry."
)
ENTRIES = Counter("requiem_audit_entries", "Audit entries linked into the chain.")
VERIFY_FAILURES = Counter(
    "requiem_audit_verify_failures", "Audit chain verifications that found damage."
)

INTERVAL_S = 0.1
IDLE_CHECK_S = 1.0


def _when(moment: Any) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return audit_chain.ts_text(moment)


def link(
    factory: sessionmaker[Session], settings: Settings, signer: AuditSigner | None
) -> LinkReport:
    """Link everything pending now and count it in the metrics."""
    report = audit_chain.link_pending(factory, settings, signer)
    ENTRIES.inc(report.linked)
    return report


def pending(factory: sessionmaker[Session]) -> dict[str, Any]:
    """``{"count", "oldest_age_s"}`` of the pending entries; updates the gauges."""
    with factory() as session:
        count, age = audit_chain.pending_summary(session)
    PENDING.set(count)
    LAG.set(age)
    return {"count": count, "oldest_age_s": round(age, 3)}


def status(factory: sessionmaker[Session]) -> dict[str, Any]:
    """Head, lag, and the latest flush, checkpoint and verification, from the store."""
    with factory() as session:
        head_seq, head_hash = audit_chain.read_head(session)
        count, age = audit_chain.pending_summary(session)
        checkpoint = audit_chain.latest_checkpoint(session)
        runs = {
            run.kind: run for run in session.execute(select(AuditRun)).scalars().all()
        }
    PENDING.set(count)
    LAG.set(age)
    flush_run, verify_run = runs.get("flush"), runs.get("verify")
    return {
        "head_seq": head_seq,
        "head_hash": head_hash,
        "pending": count,
        "lag_s": round(age, 3),
        "last_flush": None
        if flush_run is None
        else {
            "at": _when(flush_run.at),
            "count": flush_run.count,
            "head_seq": flush_run.head_seq,
        },
        "last_checkpoint": None
        if checkpoint is None
        else {
            "seq": checkpoint.seq,
            "head_hash": checkpoint.head_hash,
            "signed_at": _when(checkpoint.signed_at),
            "key_id": checkpoint.key_id,
        },
        "last_verification": None
        if verify_run is None
        else {
            "at": _when(verify_run.at),
            "ok": verify_run.ok,
            "checked": verify_run.count,
            "head_seq": verify_run.head_seq,
            "first_bad_seq": verify_run.first_bad_seq,
            "damage": verify_run.damage,
        },
    }


class AuditService:
    """Background linking of pending audit entries for one server process."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        *,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._factory = session_factory
        self._settings = settings
        self._interval_s = interval_s
        self._signer: AuditSigner | None = None
        self._flush_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def signer(self) -> AuditSigner:
        if self._signer is None:
            self._signer = AuditSigner.load(self._settings.audit_key_file)
        return self._signer

    def start(self) -> None:
        """Start the flusher thread (idempotent); creates the signing key if needed."""
        self.signer()
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="requiem-audit-flusher", daemon=True
        )
        self._thread.start()
        logger.info("audit_flusher_started", interval_s=self._interval_s)

    def stop(self, timeout: float = 30.0) -> LinkReport:
        """Stop the thread, then link everything still pending; returns that flush."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        report = self.flush()
        logger.info(
            "audit_flusher_stopped", linked=report.linked, head_seq=report.head_seq
        )
        return report

    def flush(self) -> LinkReport:
        """Link everything pending now (waits for a flush already under way)."""
        with self._flush_lock:
            return link(self._factory, self._settings, self.signer())

    def pending(self) -> dict[str, Any]:
        return pending(self._factory)

    def status(self) -> dict[str, Any]:
        document = status(self._factory)
        document["flusher"] = {
            "running": self._thread is not None and self._thread.is_alive(),
            "interval_s": self._interval_s,
            "last_error": self.last_error,
        }
        return document

    def _run(self) -> None:
        backoff = self._interval_s
        idle_since = time.monotonic()
        while not self._stopping.wait(backoff):
            try:
                # Linking takes the chain's lock (on SQLite, the database's write
                # lock); with nothing pending, only look in once a second so a
                # time-based checkpoint still falls due.
                waiting = self.pending()["count"]
                if not waiting and time.monotonic() - idle_since < IDLE_CHECK_S:
                    continue
                idle_since = time.monotonic()
                report = self.flush()
                self.pending()
            except Exception as exc:  # noqa: BLE001 - the flusher must keep going
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                logger.error("audit_flush_failed", error=self.last_error)
                backoff = min(5.0, backoff * 2)
                continue
            if report.linked:
                logger.debug("audit_flushed", linked=report.linked)
            self.last_error = None
            backoff = self._interval_s


def verify(
    factory: sessionmaker[Session],
    key: Any,
    *,
    from_seq: int = 1,
    against: Checkpoint | None = None,
    workers: int = 1,
    parallel_min: int = audit_verify_parallel.PARALLEL_MIN,
) -> VerifyReport:
    """Verify the stored chain and remember the result (``audit status`` shows it).

    A long chain is walked by ``workers`` processes when more than one is allowed.
    A failure counts in ``requiem_audit_verify_failures_total`` and is re-raised.
    """
    try:
        report = audit_verify_parallel.verify(
            factory,
            key,
            from_seq=from_seq,
            against=against,
            workers=workers,
            parallel_min=parallel_min,
        ) or audit_verify.verify_database(
            factory, key, from_seq=from_seq, against=against
        )
    except audit_chain.AuditChainBroken as exc:
        VERIFY_FAILURES.inc()
        _remember_verification(
            factory,
            ok=False,
            first_bad_seq=exc.seq,
            damage=exc.damage,
            message=exc.message[:512],
        )
        raise
    _remember_verification(
        factory, ok=True, count=report.checked, head_seq=report.head_seq
    )
    return report


def _remember_verification(factory: sessionmaker[Session], **fields: Any) -> None:
    values = {
        "ok": True,
        "count": 0,
        "head_seq": 0,
        "first_bad_seq": None,
        "damage": None,
        "message": None,
        **fields,
    }
    with factory() as session, session.begin():
        audit_chain.save_run(session, "verify", **values)
