"""The one shape every error takes on the wire, and the models OpenAPI shows for it.

Every answer that is not a success is ``{"ok": false, "error": {"code", "message",
"request_id"}}`` with the status of the error's category, whether it came from a
route, from authentication, from FastAPI's own validation or from an unknown path.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from requiem.errors import InvalidInput, RequiemError, TooLarge, Unavailable


class MethodNotAllowed(InvalidInput):
    code = "method_not_allowed"
    http_status = 405


class BadRequest(InvalidInput):
    code = "bad_request"


class UnknownParameter(InvalidInput):
    code = "unknown_parameter"


class BodyTooLarge(TooLarge):
    code = "body_too_large"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    ok: bool = False
    error: ErrorDetail


def error_body(exc: RequiemError, request_id: str | None) -> dict[str, Any]:
    """The JSON document for ``exc``."""
    detail: dict[str, Any] = {
        "code": exc.code,
        "message": exc.message,
        "request_id": request_id,
    }
    if exc.details:
        detail["details"] = exc.details
    return {"ok": False, "error": detail}


def error_response(
    exc: RequiemError,
    request_id: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(exc, request_id), status_code=exc.http_status, headers=headers
    )


_DESCRIPTIONS = {
    400: "Malformed request (bad JSON, bad field, bad parameter).",
    401: "No API key, or a key that is unknown, revoked or expired.",
    403: "The key's role may not do this, or the tenant is suspended.",
    404: "No such object visible to the caller's tenant.",
    405: "The route exists but not with this method.",
    409: "The change conflicts with existing state.",
    413: "The request body is larger than REQUIEM_MAX_BODY_BYTES.",
    429: "Too many executions waiting, or the tenant's budget is spent.",
    500: "Stored bytes failed verification, or an internal fault.",
    503: "Paused, in maintenance, shutting down, or a dependency is down.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        for status in statuses
    }
