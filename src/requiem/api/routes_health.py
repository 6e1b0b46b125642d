"""Liveness, readiness and metrics: open without a key, cheap enough to poll."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel

from requiem.api.service import get_service

router = APIRouter(tags=["health"])


class HealthCheck(BaseModel):
    ok: bool
    required: bool = True
    latency_ms: float
    error: str | None = None

    model_config = {"extra": "allow"}


class Health(BaseModel):
    status: str
    ready: bool
    live: bool
    version: str
    uptime_s: float
    checks: dict[str, HealthCheck]


@router.get(
    "/api/health",
    response_model=Health,
    summary="Liveness and readiness in one document",
    responses={503: {"model": Health, "description": "Not ready, or draining."}},
)
async def health(request: Request) -> Any:
    """200 when every required check passes, 503 otherwise (checks cached ~1 s)."""
    document = await get_service(request).health()
    return JSONResponse(document, status_code=200 if document["ready"] else 503)


@router.get(
    "/api/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format.",
        }
    },
)
def metrics_text(request: Request) -> Response:
    """Every metric of the process's default registry, in Prometheus text format.

    The health checks behind ``requiem_database_up`` are rerun first when they are
    over a second old, so a scrape never reports a stale database state.
    """
    get_service(request).refresh_health()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
