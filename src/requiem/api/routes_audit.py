"""Audit routes: flush, pending, status, verify and checkpoint for operator admins;
search for any admin, confined to the caller's own tenant unless the caller is an
admin of an operator tenant.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from requiem.api.auth import Admin
from requiem.api.responses import errors
from requiem.api.routes_admin import OperatorAdmin
from requiem.api.service import get_service
from requiem.control import audit_query, audit_service
from requiem.control.audit_service import AuditService
from requiem.errors import Unavailable

router = APIRouter(prefix="/api/admin/audit", tags=["audit"])


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"


class FlushOut(BaseModel):
    flushed: int
    head_seq: int
    head_hash: str
    checkpoint_seq: int | None


class PendingOut(BaseModel):
    count: int
    oldest_age_s: float


class StatusOut(BaseModel):
    head_seq: int
    head_hash: str
    pending: int
    lag_s: float
    last_flush: dict[str, Any] | None
    last_checkpoint: dict[str, Any] | None
    last_verification: dict[str, Any] | None
    flusher: dict[str, Any] | None = None


class VerifyOut(BaseModel):
    ok: bool
    checked: int
    first_seq: int | None
    head_seq: int
    head_hash: str
    checkpoints: int
    signatures_checked: bool
    key_source: str | None


class CheckpointOut(BaseModel):
    type: str
    seq: int
    head_hash: str
    signed_at: str
    key_id: str
    signature: str
    algorithm: str
    public_key: str


class EntryOut(BaseModel):
    seq: int
    ts: str
    actor: str | None
    tenant_id: str | None
    action: str
    target: str | None
    outcome: str
    source: str | None
    request_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


class SearchOut(BaseModel):
    entries: list[EntryOut]
    count: int


def _audit(request: Request) -> AuditService:
    service = get_service(request).audit_service
    if service is None:
        raise AuditUnavailable("the audit flusher is not running in this server")
    return service


@router.post(
    "/flush",
    response_model=FlushOut,
    summary="Link every pending audit entry into the chain now",
    responses=errors(401, 403, 503),
)
async def flush(request: Request, principal: OperatorAdmin) -> Any:
    report = await anyio.to_thread.run_sync(_audit(request).flush)
    return {
        "flushed": report.linked,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "checkpoint_seq": report.checkpoint_seq,
    }


@router.get(
    "/pending",
    response_model=PendingOut,
    summary="Entries durable but not yet chained, and the oldest one's age",
    responses=errors(401, 403, 503),
)
async def pending(request: Request, principal: OperatorAdmin) -> Any:
    return await anyio.to_thread.run_sync(_audit(request).pending)


@router.get(
    "/status",
    response_model=StatusOut,
    summary="Head, lag, last flush, last checkpoint, last verification",
    responses=errors(401, 403, 503),
)
async def status(request: Request, principal: OperatorAdmin) -> Any:
    return await anyio.to_thread.run_sync(_audit(request).status)


@router.post(
    "/verify",
    response_model=VerifyOut,
    summary="Walk the whole chain and check every hash and checkpoint",
    responses=errors(401, 403, 500, 503),
)
async def verify(request: Request, principal: OperatorAdmin) -> Any:
    audit = _audit(request)
    sessions = get_service(request).sessions

    def run() -> dict[str, Any]:
        report = audit_service.verify(sessions, audit.signer().public_key)
        report.key_source = "service"
        return report.to_dict()

    return await anyio.to_thread.run_sync(run)


@router.get(
    "/checkpoint",
    response_model=CheckpointOut,
    summary="A signed checkpoint at the current head, with the public key",
    responses=errors(401, 403, 404, 503),
)
async def checkpoint(request: Request, principal: OperatorAdmin) -> Any:
    audit = _audit(request)
    sessions = get_service(request).sessions

    def run() -> dict[str, Any]:
        signer = audit.signer()
        signed = audit_query.head_checkpoint(sessions, signer)
        return audit_query.checkpoint_document(signed, signer)

    return await anyio.to_thread.run_sync(run)


@router.get(
    "/search",
    response_model=SearchOut,
    summary="Audit entries by actor, tenant, action and time, newest first",
    responses=errors(400, 401, 403),
)
async def search(
    request: Request,
    principal: Admin,
    user: Annotated[str | None, Query(max_length=128)] = None,
    tenant: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[str | None, Query(max_length=64)] = None,
    until: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=audit_query.MAX_LIMIT)] = 100,
) -> Any:
    query = audit_query.SearchQuery.from_text(
        user=user, tenant=tenant, action=action, since=since, until=until, limit=limit
    )
    # Invariant 6: a tenant's admin sees only that tenant's entries.
    only_tenant = None if principal.is_operator else principal.tenant_id
    sessions = get_service(request).sessions
    entries = await anyio.to_thread.run_sync(
        lambda: audit_query.search(sessions, query, only_tenant=only_tenant)
    )
    return {"entries": entries, "count": len(entries)}
