"""The audit log's write side: record an entry durably before acknowledging.

``record`` makes the entry durable in ``audit_pending`` inside the caller's own
transaction when one is given, so the state change and its audit entry commit or
roll back together. Linking pending entries into the hash chain happens later, in
batches (:mod:`requiem.control.audit_chain`, driven by :class:`AuditService` in the
server or by ``requiem audit flush``).

What is written is already safe to keep forever: secrets are scrubbed from every
field (:mod:`requiem.control.audit_scrub`), ``details`` is stored as RFC 8785 JSON so
linking never re-encodes it, and over-long fields are cut to their column's width so
a pending row can always be linked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from requiem import digest
from requiem.control.audit_chain import ts_text
from requiem.control.audit_scrub import scrub, scrub_text
from requiem.control.audit_service import AuditService
from requiem.store.models import AuditPending, utcnow

__all__ = [
    "AuditService",
    "canonical_details",
    "pending_entry",
    "record",
    "record_many",
]

# Column widths of audit_entries; a longer value is cut and marked with "…".
_WIDTHS = {
    "actor": 128,
    "tenant_id": 64,
    "action": 64,
    "target": 256,
    "outcome": 16,
    "source": 64,
    "request_id": 64,
}


_MAX_SAFE_INT = 2**53 - 1


def _plain(value: Any) -> bool:
    """True if the standard library's JSON of ``value`` is already RFC 8785.

    That holds without floats (their text differs), with integers JSON can carry
    exactly, and with ASCII keys (sorted the same by code point and by UTF-16).
    """
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int):
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and k.isascii() and _plain(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return False


def canonical_details(value: Any) -> bytes:
    """RFC 8785 bytes of ``value``, by the C encoder when that provably agrees.

    The ``rfc8785`` library is pure Python and was most of the cost of recording an
    entry; a test compares both on random values.
    """
    if _plain(value):
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: let the library refuse it with its own error
    return digest.canonical_json(value)


def _field(name: str, value: object) -> str | None:
    if value is None:
        return None
    text = scrub_text(str(value))
    # A lone surrogate cannot be stored as UTF-8; keep it visible, escaped.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    width = _WIDTHS[name]
    return text if len(text) <= width else text[: width - 1] + "…"


def pending_entry(action: str, **fields: Any) -> str:
    """The JSON text a pending row holds: scrubbed, cut to width, details canonical.

    ``fields`` are :func:`record`'s keyword arguments. Raises ``json_parse_error``
    if ``details`` is not JSON (NaN, a set, an object), so the caller learns at once
    rather than the linker later.
    """
    unknown = set(fields) - set(_WIDTHS) - {"details"}
    if unknown:
        msg = f"unknown audit entry fields: {', '.join(sorted(unknown))}"
        raise TypeError(msg)
    fields["outcome"] = fields.get("outcome") or "success"
    details = fields.get("details")
    details_json = canonical_details(scrub(dict(details or {})))
    fields["action"] = action
    entry = {name: _field(name, fields.get(name)) for name in _WIDTHS}
    entry["ts"] = ts_text(utcnow())
    entry["details_json"] = details_json.decode("utf-8")
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


def record(
    target_session: Session | sessionmaker[Session],
    action: str,
    *,
    actor: str | None = None,
    tenant_id: str | None = None,
    target: str | None = None,
    outcome: str = "success",
    source: str | None = None,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Record one audit entry; durable once the given session's transaction commits."""
    entry = pending_entry(
        action,
        actor=actor,
        tenant_id=tenant_id,
        target=target,
        outcome=outcome,
        source=source,
        request_id=request_id,
        details=details,
    )
    row = AuditPending(entry=entry, created_at=utcnow())
    if isinstance(target_session, Session):
        target_session.add(row)
        return
    with target_session() as session, session.begin():
        session.add(row)


def record_many(
    target_session: Session | sessionmaker[Session],
    entries: Iterable[Mapping[str, Any]],
) -> int:
    """Record many entries in one statement (imports, bulk jobs); returns how many.

    Each mapping holds ``record``'s keyword arguments plus ``action``.
    """
    now = utcnow()
    rows = [
        {"entry": pending_entry(**dict(entry)), "created_at": now} for entry in entries
    ]
    if not rows:
        return 0
    if isinstance(target_session, Session):
        target_session.execute(insert(AuditPending), rows)
        return len(rows)
    with target_session() as session, session.begin():
        session.execute(insert(AuditPending), rows)
    return len(rows)
