"""Executions for the caller's tenant: run, read, list, replay; and a status page."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from requiem.api import metrics
from requiem.api.auth import Operator, Viewer
from requiem.api.bodies import body_schema
from requiem.api.responses import BadRequest, errors
from requiem.api.service import Service, get_service
from requiem.control.executions import MAX_PAGE, ExecutionService
from requiem.control.flags import ExecutionPaused
from requiem.engine import Difference, ExecutionRequest, ExecutionResult

router = APIRouter(prefix="/api/v1", tags=["executions"])

PAUSED_RETRY_AFTER_S = 30
T = TypeVar("T")


class Status(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    error = "error"


class ExecutionOut(BaseModel):
    id: str
    tenant_id: str
    status: Status
    request_digest: str
    result_digest: str | None
    result_blob: str | None
    exit_code: int | None
    error_code: str | None
    cache_hit: bool
    replay_of: str | None
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    result: ExecutionResult | None


class ExecutionPage(BaseModel):
    items: list[ExecutionOut]
    next_cursor: str | None


class ReplayOut(BaseModel):
    ok: bool
    differences: list[Difference]
    execution: ExecutionOut


class ServerStatus(BaseModel):
    version: str
    draining: bool
    flags: dict[str, bool]
    active_requests: int
    executions_running: int
    executions_queued: int
    execution_slots: int
    pool: dict[str, Any] | None


RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
Moment = Annotated[
    str | None,
    Query(
        max_length=64,
        description="RFC 3339 date-time with offset, e.g. 2026-12-04T15:00:00Z",
        json_schema_extra={"format": "date-time"},
    ),
]


def parse_moment(name: str, text: str | None) -> datetime | None:
    """An RFC 3339 timestamp (numbers and dates without a time are refused)."""
    if text is None:
        return None
    try:
        if not RFC3339.match(text):
            raise ValueError(text)
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{name}: expected an RFC 3339 date-time such as 2026-12-04T15:00:00Z"
        raise BadRequest(msg) from exc


def _executions(service: Service) -> ExecutionService:
    return service.executions


async def _admitted_slot(service: Service) -> None:
    """Refuse when paused, then wait for an execution slot (429 when none frees)."""
    flags = service.flags.cached() if service.flags.fresh else None
    if flags is None:
        flags = await anyio.to_thread.run_sync(service.flags.values)
    if flags.get("execution_pause"):
        metrics.EXECUTIONS.labels("rejected").inc()
        raise ExecutionPaused(
            "executions are paused (flag execution_pause); retry later",
            retry_after_s=PAUSED_RETRY_AFTER_S,
        )
    try:
        await service.limiter.acquire()
    except Exception:
        metrics.EXECUTIONS.labels("rejected").inc()
        raise


async def _in_slot(service: Service, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread once an execution slot is free; count failures."""
    await _admitted_slot(service)
    metrics.EXECUTIONS_RUNNING.inc()
    try:
        return await anyio.to_thread.run_sync(work)
    except Exception:
        metrics.EXECUTIONS.labels("error").inc()
        raise
    finally:
        metrics.EXECUTIONS_RUNNING.dec()
        service.limiter.release()


def _count(result: ExecutionResult) -> None:
    from requiem.control.executions import outcome_of

    metrics.EXECUTIONS.labels(outcome_of(result)).inc()
    limit = result.request.get("policy", {}).get("max_memory_bytes")
    if (
        limit
        and result.exit_code in (-9, 137)
        and result.termination_reason == "exited"
    ):
        metrics.ENGINE_OOM.inc()


@router.post(
    "/executions",
    status_code=201,
    response_model=ExecutionOut,
    summary="Run a request for the caller's tenant and return its result",
    responses=errors(401, 403, 404, 429),
    openapi_extra=body_schema(ExecutionRequest),
)
async def create_execution(request: Request, principal: Operator) -> Any:
    """Synchronous within the request's timeout; 201 with the result's digests."""
    service = get_service(request)
    request_id = getattr(request.state, "request_id", None)
    raw = await request.body()
    try:
        parsed = ExecutionRequest.parse(raw)
        admitted = await anyio.to_thread.run_sync(
            _executions(service).admit, principal, parsed
        )
    except Exception:
        metrics.EXECUTIONS.labels("rejected").inc()
        raise

    document, result = await _in_slot(
        service,
        lambda: _executions(service).run(principal, admitted, request_id=request_id),
    )
    _count(result)
    return JSONResponse(document, status_code=201)


@router.get(
    "/executions",
    response_model=ExecutionPage,
    summary="The tenant's executions, newest first, paged",
    responses=errors(401),
)
async def list_executions(
    request: Request,
    principal: Viewer,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    status: Status | None = None,
    since: Moment = None,
    until: Moment = None,
) -> Any:
    service = get_service(request)
    page = await anyio.to_thread.run_sync(
        lambda: _executions(service).list(
            principal.tenant_id,
            limit=limit,
            cursor=cursor,
            status=status.value if status else None,
            since=parse_moment("since", since),
            until=parse_moment("until", until),
        )
    )
    return JSONResponse({"items": page.items, "next_cursor": page.next_cursor})


@router.get(
    "/executions/{execution_id}",
    response_model=ExecutionOut,
    summary="One execution of the tenant, with its stored result",
    responses=errors(401, 404),
)
async def get_execution(execution_id: str, request: Request, principal: Viewer) -> Any:
    service = get_service(request)
    document = await anyio.to_thread.run_sync(
        _executions(service).get, principal.tenant_id, execution_id
    )
    return JSONResponse(document)


@router.post(
    "/executions/{execution_id}/replay",
    response_model=ReplayOut,
    summary="Run a recorded execution again and compare its reproducible fields",
    responses=errors(401, 403, 404, 429),
)
async def replay_execution(
    execution_id: str, request: Request, principal: Operator
) -> Any:
    service = get_service(request)
    request_id = getattr(request.state, "request_id", None)
    document, report = await _in_slot(
        service,
        lambda: _executions(service).replay(
            principal, execution_id, request_id=request_id
        ),
    )
    _count(report.replayed)
    return JSONResponse(
        {
            "ok": report.ok,
            "differences": [d.model_dump(mode="json") for d in report.differences],
            "execution": document,
        }
    )


@router.get(
    "/status",
    response_model=ServerStatus,
    summary="This server process: flags, load, execution slots, pool",
    responses=errors(401),
)
async def server_status(request: Request, principal: Viewer) -> Any:
    service = get_service(request)
    return await anyio.to_thread.run_sync(service.status)
