"""The tenant's view of the CAS: upload, download (verified), existence.

A tenant sees an object only if it stored or produced it (``cas_ownership``); any
other digest answers 404 ``cas_object_not_found`` as if it did not exist at all.
Downloads are verified before the first byte is sent: a damaged object answers 500
``cas_integrity_failed`` and is never served.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from requiem import digest as dg
from requiem.api import metrics
from requiem.api.auth import Operator, Viewer
from requiem.api.responses import errors
from requiem.api.service import Service, get_service
from requiem.cas.store import CasObjectMissing, InvalidDigest, ObjectMeta
from requiem.control import audit
from requiem.control.credentials import Principal
from requiem.control.executions import own, owns
from requiem.control.tenants import require_active

router = APIRouter(prefix="/api/v1/cas", tags=["cas"])

IN_MEMORY_LIMIT = 4 << 20
BINARY = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
}


class Stored(BaseModel):
    digest: str
    size: int


def _visible(service: Service, principal: Principal, digest: str) -> ObjectMeta:
    """The object's metadata if this tenant may see it; 404 otherwise."""
    if not dg.is_digest(digest):
        raise InvalidDigest(f"{digest[:80]!r} is not a digest (64 lowercase hex)")
    with service.sessions() as session:
        allowed = owns(session, principal.tenant_id, digest)
    if not allowed:
        raise CasObjectMissing(f"no CAS object {digest}", digest=digest)
    return service.cas.meta(digest)


@router.put(
    "",
    status_code=201,
    response_model=Stored,
    summary="Store the raw request body; returns its BLAKE3 digest",
    responses=errors(401, 403, 404),
    openapi_extra={"requestBody": {"required": True, "content": BINARY}},
)
async def put_object(request: Request, principal: Operator) -> Any:
    service = get_service(request)
    request_id = getattr(request.state, "request_id", None)
    body = await request.body()

    def store() -> str:
        with service.sessions() as session:
            require_active(session, principal.tenant_id)
        digest = service.cas.put_bytes(body)
        service.cas.pin(digest, f"tenant:{principal.tenant_id}")

        def write(session: Session) -> None:
            own(session, principal.tenant_id, [digest])
            audit.record(
                session,
                "cas.put",
                actor=principal.actor,
                tenant_id=principal.tenant_id,
                target=digest,
                source="api",
                request_id=request_id,
                details={"size": len(body)},
            )

        service.executions.writer.write(write)
        return digest

    digest = await anyio.to_thread.run_sync(store)
    return JSONResponse({"digest": digest, "size": len(body)}, status_code=201)


@router.get(
    "/{digest}",
    summary="The object's bytes, verified before they are sent",
    response_class=Response,
    responses={
        200: {"content": BINARY, "description": "The object's bytes."},
        **errors(401, 404),
    },
)
async def get_object(digest: str, request: Request, principal: Viewer) -> Any:
    service = get_service(request)
    started = time.perf_counter()

    def read() -> tuple[ObjectMeta, bytes | str]:
        meta = _visible(service, principal, digest)
        if meta.size <= IN_MEMORY_LIMIT:
            return meta, service.cas.get_bytes(digest)
        fd, path = tempfile.mkstemp(dir=service.cas.tmp, prefix="api-get-")
        os.close(fd)
        try:
            service.cas.get_to_file(digest, path)
        except BaseException:
            os.unlink(path)
            raise
        return meta, path

    meta, content = await anyio.to_thread.run_sync(read)
    metrics.CAS_READ_LATENCY.observe(time.perf_counter() - started)
    headers = {"x-content-digest": digest, "cache-control": "private, immutable"}
    if isinstance(content, bytes):
        return Response(content, media_type="application/octet-stream", headers=headers)
    return FileResponse(
        content,
        media_type="application/octet-stream",
        headers=headers,
        background=BackgroundTask(os.unlink, content),
    )


@router.head(
    "/{digest}",
    summary="Whether the tenant can read this object (200 with its size, or 404)",
    response_class=Response,
    responses={
        200: {"description": "Present; Content-Length is its size."},
        **errors(401, 404),
    },
)
async def head_object(digest: str, request: Request, principal: Viewer) -> Any:
    service = get_service(request)
    meta = await anyio.to_thread.run_sync(_visible, service, principal, digest)
    return Response(
        headers={
            "content-length": str(meta.size),
            "content-type": "application/octet-stream",
            "x-content-digest": digest,
        }
    )
