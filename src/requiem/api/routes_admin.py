"""Admin routes: operational flags and the database pool (operator tenants only).

Flags and the pool are shared by every tenant, so changing them needs an admin key
of an operator tenant (``requiem tenant create NAME --operator``).
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, StrictBool

from requiem.api.auth import Admin, Principal
from requiem.api.bodies import body_schema, parse_body
from requiem.api.responses import errors
from requiem.api.service import get_service
from requiem.control import flags
from requiem.errors import Forbidden
from requiem.store.db import transaction

router = APIRouter(prefix="/api/admin", tags=["admin"])


async def operator_admin(principal: Admin) -> Principal:
    """An admin key of an operator tenant."""
    if not principal.is_operator:
        msg = "this needs an admin key of an operator tenant"
        raise Forbidden(msg, needed="operator tenant")
    return principal


OperatorAdmin = Annotated[Principal, Depends(operator_admin)]


class FlagChange(BaseModel):
    value: StrictBool

    model_config = {"extra": "forbid"}


class FlagOut(BaseModel):
    name: str
    value: bool
    updated_at: str | None
    updated_by: str | None


class FlagChanged(FlagOut):
    old_value: bool


class FlagList(BaseModel):
    flags: list[FlagOut]


@router.get(
    "/flags",
    response_model=FlagList,
    summary="Every operational flag",
    responses=errors(401, 403),
)
async def list_flags(request: Request, principal: OperatorAdmin) -> Any:
    service = get_service(request)

    def read() -> list[dict[str, Any]]:
        with service.sessions() as session:
            return [flags.read(session, name).as_dict() for name in flags.FLAGS]

    return {"flags": await anyio.to_thread.run_sync(read)}


@router.get(
    "/flags/{name}",
    response_model=FlagOut,
    summary="One flag's value and who set it",
    responses=errors(401, 403, 404),
)
async def get_flag(name: str, request: Request, principal: OperatorAdmin) -> Any:
    flags.check_name(name)
    service = get_service(request)

    def read() -> dict[str, Any]:
        with service.sessions() as session:
            return flags.read(session, name).as_dict()

    return await anyio.to_thread.run_sync(read)


@router.post(
    "/flags/{name}",
    response_model=FlagChanged,
    summary="Set a flag to true or false (audited: who, when, old → new)",
    responses=errors(401, 403, 404),
    openapi_extra=body_schema(FlagChange),
)
async def set_flag(name: str, request: Request, principal: OperatorAdmin) -> Any:
    flags.check_name(name)
    change = await parse_body(request, FlagChange)
    service = get_service(request)
    request_id = getattr(request.state, "request_id", None)

    def write() -> dict[str, Any]:
        with transaction(service.sessions) as session:
            old, state = flags.write(
                session,
                name,
                change.value,
                actor=principal.actor,
                tenant_id=principal.tenant_id,
                source="api",
                request_id=request_id,
            )
        service.flags.invalidate()
        return {**state.as_dict(), "old_value": old}

    return await anyio.to_thread.run_sync(write)


class PoolStatus(BaseModel):
    pool: str
    size: int
    checked_out: int
    checked_in: int
    overflow: int
    max_overflow: int
    timeout_s: float | None
    waiters: int
    checkouts_total: int
    draining: bool


class PoolLeak(BaseModel):
    held_s: float
    since: str
    thread: str
    request_id: str | None
    stack: list[str]


class PoolDrain(BaseModel):
    drained: bool
    checked_out: int
    in_flight: int
    waited_s: float
    holders: list[PoolLeak]


class PoolLeaks(BaseModel):
    threshold_s: float
    leaks: list[PoolLeak]


@router.get(
    "/db/pool",
    response_model=PoolStatus,
    summary="This process's database pool: size, checked out, overflow, waiters",
    responses=errors(401, 403),
)
async def pool_status(request: Request, principal: OperatorAdmin) -> Any:
    return get_service(request).pool.status()


@router.post(
    "/db/pool/drain",
    response_model=PoolDrain,
    summary=(
        "Refuse new checkouts; let requests already in flight record their work; "
        "wait for every connection to come back"
    ),
    responses=errors(401, 403),
)
async def pool_drain(
    request: Request,
    principal: OperatorAdmin,
    timeout_s: Annotated[float, Query(ge=0, le=300)] = 10.0,
) -> Any:
    service = get_service(request)
    return await anyio.to_thread.run_sync(service.drain_pool, timeout_s)


@router.get(
    "/db/pool/leaks",
    response_model=PoolLeaks,
    summary="Connections held longer than threshold_s, with who took them",
    responses=errors(401, 403),
)
async def pool_leaks(
    request: Request,
    principal: OperatorAdmin,
    threshold_s: Annotated[float, Query(ge=0, le=86400)] = 30.0,
) -> Any:
    leaks = get_service(request).pool.leaks(threshold_s)
    return {"threshold_s": threshold_s, "leaks": leaks}


@router.post(
    "/db/pool/reset",
    response_model=PoolStatus,
    summary="Close every pooled connection and accept checkouts again",
    responses=errors(401, 403),
)
async def pool_reset(request: Request, principal: OperatorAdmin) -> Any:
    return await anyio.to_thread.run_sync(get_service(request).reset_pool)
