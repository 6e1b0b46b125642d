"""Reading the audit log: search by who, which tenant, what and when; export.

Times are accepted the way the runbook writes them (``24h ago``, ``7 days ago``,
``30m ago``, ``now``) or as ISO-8601 (a date, or a date and time; UTC unless an
offset is given). An export is contiguous from the first entry at or after
``since`` to the head, and ends with a checkpoint signed at that head, so the file
proves itself with ``requiem audit verify --file`` and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from requiem.control import audit_chain
from requiem.control.audit_chain import ts_text
from requiem.control.audit_keys import AuditSigner, Checkpoint
from requiem.control.audit_verify import export_line
from requiem.errors import InvalidInput, NotFound
from requiem.store.models import AuditEntry, utcnow

MAX_LIMIT = 10_000
_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s+ago\s*$", re.IGNORECASE)


class InvalidTime(InvalidInput):
    code = "invalid_time"


class AuditEmpty(NotFound):
    code = "audit_empty"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """The UTC moment ``text`` names; ``invalid_time`` when it names none."""
    now = now or utcnow()
    cleaned = text.strip()
    if cleaned.lower() == "now":
        return now
    match = _AGO.match(cleaned)
    if match:
        unit = _UNITS.get(match.group(2).lower())
        if unit is not None:
            try:
                return now - timedelta(seconds=float(match.group(1)) * unit)
            except OverflowError:
                pass
    else:
        try:
            moment = datetime.fromisoformat(cleaned)
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                return moment.replace(tzinfo=UTC)
            try:
                return moment.astimezone(UTC)
            except OverflowError:  # year 1 or 9999 pushed past the calendar's edge
                pass
    msg = (
        f"cannot read {text!r} as a time: use e.g. '24h ago', '7 days ago', "
        "'30m ago' or ISO-8601 like 2026-01-31T12:00:00Z"
    )
    raise InvalidTime(msg, value=text)


_COLUMNS = (
    "seq",
    "ts",
    "actor",
    "tenant_id",
    "action",
    "target",
    "outcome",
    "source",
    "request_id",
    "details",
    "prev_hash",
    "hash",
)


def stored_fields(row: AuditEntry) -> dict[str, Any]:
    """The entry's columns as stored (``details`` as its JSON text)."""
    return {name: getattr(row, name) for name in _COLUMNS}


def entry_dict(row: AuditEntry) -> dict[str, Any]:
    """An entry as commands and the API show it."""
    fields = stored_fields(row)
    fields["ts"] = ts_text(row.ts)
    fields["details"] = json.loads(row.details)
    return fields


@dataclass(frozen=True)
class SearchQuery:
    user: str | None = None
    tenant: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100

    @classmethod
    def from_text(
        cls,
        *,
        user: str | None,
        tenant: str | None,
        action: str | None,
        since: str | None,
        until: str | None,
        limit: int,
    ) -> SearchQuery:
        """The query as a person typed it: times like ``24h ago`` or ISO-8601."""
        return cls(
            user=user,
            tenant=tenant,
            action=action,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            limit=limit,
        )


def search(
    factory: sessionmaker[Session],
    query: SearchQuery,
    *,
    only_tenant: str | None = None,
) -> list[dict[str, Any]]:
    """Matching entries, newest first; ``only_tenant`` confines to one tenant."""
    statement = select(AuditEntry)
    if only_tenant is not None:
        statement = statement.where(AuditEntry.tenant_id == only_tenant)
    if query.user is not None:
        statement = statement.where(AuditEntry.actor == query.user)
    if query.tenant is not None:
        statement = statement.where(AuditEntry.tenant_id == query.tenant)
    if query.action is not None:
        statement = statement.where(AuditEntry.action == query.action)
    if query.since is not None:
        statement = statement.where(AuditEntry.ts >= query.since)
    if query.until is not None:
        statement = statement.where(AuditEntry.ts <= query.until)
    limit = max(1, min(query.limit, MAX_LIMIT))
    statement = statement.order_by(AuditEntry.seq.desc()).limit(limit)
    with factory() as session:
        return [entry_dict(row) for row in session.execute(statement).scalars()]


def head_checkpoint(factory: sessionmaker[Session], signer: AuditSigner) -> Checkpoint:
    """A checkpoint at the current head: the latest one, or a new one signed now."""
    with factory() as session, session.begin():
        audit_chain.lock_chain(session)
        head_seq, head_hash = audit_chain.read_head(session)
        if head_seq == 0:
            raise AuditEmpty("the audit log has no entries yet")
        row = audit_chain.latest_checkpoint(session)
        if row is None or row.seq != head_seq:
            row = audit_chain.write_checkpoint(session, signer, head_seq, head_hash)
        return Checkpoint(
            row.seq, row.head_hash, ts_text(row.signed_at), row.key_id, row.signature
        )


def checkpoint_document(checkpoint: Checkpoint, signer: AuditSigner) -> dict[str, Any]:
    """The checkpoint as a file keeps it: with type and the public key (PEM)."""
    return {
        "type": "checkpoint",
        **checkpoint.to_dict(),
        "public_key": signer.public_pem(),
    }


def export(
    factory: sessionmaker[Session],
    signer: AuditSigner,
    since: datetime | None,
) -> Iterator[str]:
    """JSON Lines of every entry from ``since`` to the head, then the checkpoint."""
    checkpoint = head_checkpoint(factory, signer)
    with factory() as session:
        first = 1
        if since is not None:
            found = session.execute(
                select(func.min(AuditEntry.seq)).where(AuditEntry.ts >= since)
            ).scalar_one_or_none()
            first = checkpoint.seq + 1 if found is None else int(found)
        statement = (
            select(AuditEntry)
            .where(AuditEntry.seq >= first, AuditEntry.seq <= checkpoint.seq)
            .order_by(AuditEntry.seq)
            .execution_options(yield_per=2000)
        )
        for row in session.execute(statement).scalars():
            yield export_line(stored_fields(row))
            session.expunge(row)
    yield json.dumps(checkpoint_document(checkpoint, signer), sort_keys=True)
