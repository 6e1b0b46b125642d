"""The audit log's write side: record an entry durably before acknowledging.

``record`` makes the entry durable in ``audit_pending`` inside the caller's own
transaction when one is given, so the state change and its audit entry commit or
roll back together. Linking pending entries into the hash chain happens later, in
batches.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from requiem.store.models import AuditPending, utcnow


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
    entry = {
        "ts": utcnow().isoformat(),
        "actor": actor,
        "tenant_id": tenant_id,
        "action": action,
        "target": target,
        "outcome": outcome,
        "source": source,
        "request_id": request_id,
        "details": details or {},
    }
    row = AuditPending(entry=json.dumps(entry, sort_keys=True))
    if isinstance(target_session, Session):
        target_session.add(row)
        return
    with target_session() as session, session.begin():
        session.add(row)
