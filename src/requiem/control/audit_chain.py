"""The audit hash chain: what an entry's hash covers and how entries join the chain.

Entry ``n``'s hash is ``of_record("audit", record)`` where ``record`` holds
``prev_hash`` (entry ``n-1``'s hash, 64 zeros for entry 1), ``seq`` and every field
of the entry, ``details`` as a JSON object and ``ts`` as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``. Editing, deleting, inserting or reordering any entry
therefore breaks the chain at that point.

Linking (``link_pending``) moves durable rows from ``audit_pending`` into the chain in
batches. Exactly one linker may run at a time across every process: on PostgreSQL it
holds a transaction-scoped advisory lock, on SQLite the database write lock taken by
``BEGIN IMMEDIATE``; ``seq`` is the primary key, so even a bug here could not fork
the chain, only fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring as _json_str
from typing import Any

from blake3 import blake3 as _blake3
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from requiem import digest
from requiem.control.audit_keys import AuditSigner
from requiem.control.audit_scrub import scrub
from requiem.errors import IntegrityFailure, RequiemError
from requiem.settings import Settings
from requiem.store.models import (
    AuditCheckpoint,
    AuditEntry,
    AuditPending,
    AuditRun,
    utcnow,
)

GENESIS = "0" * 64
BATCH = 5000
# Any fixed 64-bit number; it names "the audit linker" among advisory locks.
_PG_LOCK_KEY = 0x5245_5155_4945_4D41
FIELDS = (
    "ts",
    "actor",
    "tenant_id",
    "action",
    "target",
    "outcome",
    "source",
    "request_id",
)
DAMAGE_KINDS = (
    "hash_mismatch",
    "broken_link",
    "gap",
    "checkpoint_mismatch",
    "bad_signature",
    "truncated",
)


class AuditChainBroken(IntegrityFailure):
    """The chain does not verify; ``seq`` is the first bad entry, ``damage`` why."""

    code = "audit_chain_broken"

    def __init__(self, message: str, *, seq: int, damage: str) -> None:
        super().__init__(message, seq=seq, damage=damage)
        self.seq = seq
        self.damage = damage


def ts_text(value: datetime | str) -> str:
    """The canonical UTC text of a timestamp as the chain hashes it."""
    if isinstance(value, str):
        # SQLite hands back what SQLAlchemy stored: 'YYYY-MM-DD HH:MM:SS.ffffff'.
        if len(value) == 26 and value[10] == " " and value[19] == ".":
            return f"{value[:10]}T{value[11:]}Z"
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    else:
        value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}Z"
    )


def parse_ts(text_value: str) -> datetime:
    """The aware UTC datetime of a canonical (or any ISO-8601) timestamp."""
    value = datetime.fromisoformat(text_value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# The hashed record's keys in RFC 8785 order; values are filled in already encoded.
_TEMPLATE = (
    '{"action":%s,"actor":%s,"details":%s,"outcome":%s,"prev_hash":%s,'
    '"request_id":%s,"seq":%d,"source":%s,"target":%s,"tenant_id":%s,"ts":%s}'
)


def entry_hash(
    seq: int,
    prev_hash: str,
    ts: str,
    actor: str | None,
    tenant_id: str | None,
    action: str,
    target: str | None,
    outcome: str,
    source: str | None,
    request_id: str | None,
    details_json: str,
) -> str:
    """``of_record("audit", record)`` computed without re-canonicalising details.

    ``details_json`` must be the RFC 8785 text of the details object (as stored);
    the other fields are strings whose JSON escaping by the standard library is the
    same as RFC 8785's, and the keys below are already in RFC 8785 order. A test
    proves the equality with :func:`requiem.digest.of_record` on random entries.
    """
    body = _TEMPLATE % (
        _json_str(action),
        "null" if actor is None else _json_str(actor),
        details_json,
        _json_str(outcome),
        _json_str(prev_hash),
        "null" if request_id is None else _json_str(request_id),
        seq,
        "null" if source is None else _json_str(source),
        "null" if target is None else _json_str(target),
        "null" if tenant_id is None else _json_str(tenant_id),
        _json_str(ts),
    )
    return _blake3(b"audit:" + body.encode("utf-8", "surrogatepass")).hexdigest()


def hashed_record(row: dict[str, Any]) -> dict[str, Any]:
    """The record an entry's hash covers, as a third party would rebuild it."""
    record = {name: row[name] for name in FIELDS}
    record["ts"] = ts_text(row["ts"])
    record["details"] = json.loads(row["details"])
    record["seq"] = row["seq"]
    record["prev_hash"] = row["prev_hash"]
    return record


@dataclass(frozen=True)
class LinkReport:
    linked: int
    head_seq: int
    head_hash: str
    checkpoint_seq: int | None


def lock_chain(session: Session) -> None:
    """Become the only linker until ``session``'s transaction ends."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        # An open SQLite transaction here already wrote (or began IMMEDIATE, as
        # engines built for migrations do), so it holds the write lock.
        if not connection.connection.dbapi_connection.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY}
        )


def read_head(session: Session) -> tuple[int, str]:
    row = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


def latest_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.execute(
        select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1)
    ).scalar_one_or_none()


def canonical_ts(value: str) -> str:
    """``value`` (ISO-8601) as the chain's timestamp text; fast when already so."""
    if len(value) == 27 and value[10] == "T" and value[26] == "Z":
        return value
    return ts_text(parse_ts(value))


def _pending_to_row(pending_id: int, raw: str) -> dict[str, Any]:
    """The entry a pending row holds; an unreadable one becomes evidence of itself."""
    try:
        entry = json.loads(raw)
        row = {name: entry.get(name) for name in FIELDS}
        row["ts"] = canonical_ts(entry["ts"])
        details = entry.get("details_json")
        if details is None:  # written before details were stored canonical
            details = digest.canonical_json(scrub(entry.get("details") or {}))
            details = details.decode("utf-8")
        elif not (isinstance(details, str) and details[:1] == "{"):
            raise ValueError("details must be a JSON object")
        row["details"] = details
        if not isinstance(row["action"], str) or not isinstance(row["outcome"], str):
            raise ValueError("action and outcome must be strings")
        return row
    except (ValueError, KeyError, TypeError, AttributeError, RequiemError):
        # NOTE: a row the chain cannot read must not block every later entry; it is
        # linked as a record of its own damage, with the digest of what it held.
        return {
            "ts": ts_text(utcnow()),
            "actor": None,
            "tenant_id": None,
            "action": "audit.pending_unreadable",
            "target": f"audit_pending:{pending_id}",
            "outcome": "error",
            "source": None,
            "request_id": None,
            "details": digest.canonical_json(
                {"digest": digest.of_bytes(raw.encode("utf-8", "surrogatepass"))}
            ).decode("utf-8"),
        }


_INSERT_COLUMNS = (
    "seq, ts, actor, tenant_id, action, target, outcome, source, request_id, "
    "details, prev_hash, hash"
)


def _insert_entries(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """One executemany straight to the driver (the ORM's per-row work dominated).

    ``ts`` arrives as canonical text; SQLite gets the text SQLAlchemy itself stores
    for a DateTime, PostgreSQL an aware datetime.
    """
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        marks = ", ".join("?" * 12)
        params = [(r[0], f"{r[1][:10]} {r[1][11:26]}", *r[2:]) for r in rows]
    else:
        marks = ", ".join(["%s"] * 12)
        params = [(r[0], parse_ts(r[1]), *r[2:]) for r in rows]
    sql = f"INSERT INTO audit_entries ({_INSERT_COLUMNS}) VALUES ({marks})"
    connection.exec_driver_sql(sql, params)


def link_batch(session: Session, limit: int = BATCH) -> tuple[int, int, str]:
    """Link up to ``limit`` pending rows; caller holds the lock. → (n, seq, hash)."""
    seq, head = read_head(session)
    pending = session.execute(
        select(AuditPending.id, AuditPending.entry)
        .order_by(AuditPending.id)
        .limit(limit)
    ).all()
    if not pending:
        return 0, seq, head

    rows = []
    for pending_id, raw in pending:
        row = _pending_to_row(pending_id, raw)
        seq += 1
        values = (
            row["ts"],
            row["actor"],
            row["tenant_id"],
            row["action"],
            row["target"],
            row["outcome"],
            row["source"],
            row["request_id"],
            row["details"],
        )
        prev, head = head, entry_hash(seq, head, *values)
        rows.append((seq, *values, prev, head))

    _insert_entries(session, rows)
    session.execute(
        delete(AuditPending).where(AuditPending.id.in_([p[0] for p in pending]))
    )
    return len(rows), seq, head


def checkpoint_due(
    session: Session, head_seq: int, settings: Settings, *, force: bool = False
) -> bool:
    """True when the head is far or old enough past the latest checkpoint."""
    if head_seq == 0:
        return False
    last = latest_checkpoint(session)
    if last is None:
        return True
    if last.seq >= head_seq:
        return False
    if force or head_seq - last.seq >= settings.int("REQUIEM_AUDIT_CHECKPOINT_EVERY"):
        return True
    signed_at = last.signed_at
    if signed_at.tzinfo is None:
        signed_at = signed_at.replace(tzinfo=UTC)
    age = (utcnow() - signed_at).total_seconds()
    return age >= settings.float("REQUIEM_AUDIT_CHECKPOINT_INTERVAL_S")


def write_checkpoint(
    session: Session, signer: AuditSigner, head_seq: int, head_hash: str
) -> AuditCheckpoint:
    now = utcnow()
    signed = signer.sign(head_seq, head_hash, ts_text(now))
    row = AuditCheckpoint(
        seq=head_seq,
        head_hash=head_hash,
        signed_at=now,
        key_id=signed.key_id,
        signature=signed.signature,
    )
    session.add(row)
    session.flush()
    return row


def save_run(session: Session, kind: str, **fields: Any) -> None:
    """Replace the remembered result of the latest ``kind`` run (flush, verify)."""
    fields["at"] = utcnow()
    updated = session.execute(
        AuditRun.__table__.update().where(AuditRun.kind == kind).values(**fields)
    )
    if updated.rowcount == 0:
        session.execute(insert(AuditRun).values(kind=kind, **fields))


def link_pending(
    factory: sessionmaker[Session],
    settings: Settings,
    signer: AuditSigner | None,
    *,
    max_batches: int | None = None,
    force_checkpoint: bool = False,
) -> LinkReport:
    """Link everything pending (in batches of ``BATCH``, one transaction each).

    A checkpoint is signed in the same transaction as the batch that makes it due;
    without a signer none is written.
    """
    total, checkpoint_seq, batches = 0, None, 0
    while True:
        with factory() as session, session.begin():
            lock_chain(session)
            linked, head_seq, head_hash = link_batch(session)
            due = signer is not None and checkpoint_due(
                session, head_seq, settings, force=force_checkpoint
            )
            if due:
                write_checkpoint(session, signer, head_seq, head_hash)
                checkpoint_seq = head_seq
            if linked:
                save_run(session, "flush", count=linked, head_seq=head_seq, ok=True)
        total += linked
        batches += 1
        if linked < BATCH or (max_batches is not None and batches >= max_batches):
            return LinkReport(total, head_seq, head_hash, checkpoint_seq)


def pending_summary(session: Session) -> tuple[int, float]:
    """(count of pending rows, age in seconds of the oldest, 0 when none)."""
    count, oldest = session.execute(
        select(func.count(AuditPending.id), func.min(AuditPending.created_at))
    ).one()
    if not count or oldest is None:
        return 0, 0.0
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return int(count), max(0.0, (utcnow() - oldest).total_seconds())
