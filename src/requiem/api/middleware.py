"""The one ASGI layer every request passes: id, limits, gates, metrics, last resort.

Written as plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` because it sits
on every request and the latter costs a task and a stream per call. In order, it:
gives the request an id (``X-Request-ID``, echoed on the answer); refuses bodies over
``REQUIEM_MAX_BODY_BYTES`` by ``Content-Length`` and by counting what streams in;
answers 503 while draining or in maintenance (health, metrics and admin stay open);
turns any unexpected exception into a 500 in the one error shape; and counts the
request by route template.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import traceback
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from requiem import log
from requiem.api import metrics
from requiem.api.responses import BadRequest, BodyTooLarge, ShuttingDown, error_body
from requiem.api.service import Service
from requiem.control.flags import MaintenanceMode
from requiem.errors import RequiemError
from requiem.store.pool import current_request_id

logger = log.get("requiem.api")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# /api/v1/status stays open too: `requiem status` must show the load in maintenance.
OPEN_DURING_MAINTENANCE = (
    "/api/health",
    "/api/metrics",
    "/api/admin/",
    "/api/v1/status",
)
DOCS_PATHS = ("/api/openapi.json", "/api/docs")
MAINTENANCE_RETRY_AFTER_S = 30
HEALTH_ROUTE = "/api/health"
PLANNED_REFUSALS = frozenset(
    {"shutting_down", "maintenance", "execution_paused", "pool_draining"}
)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def is_fault(route: str, status: int, code: str | None) -> bool:
    """Whether an answer counts in ``requiem_errors_total`` (the alerts' error rate).

    Faults are 5xx answers other than the deliberate ones: a health document saying
    "not ready" and the refusals an operator asks for (``PLANNED_REFUSALS``), so a
    planned drain, pause or maintenance never fires the error-rate alerts.
    """
    if status < 500 or code in PLANNED_REFUSALS:
        return False
    return not (route == HEALTH_ROUTE and code is None)


def retry_after(exc: RequiemError) -> dict[str, str]:
    """``Retry-After`` for errors that say when to come back."""
    seconds = exc.details.get("retry_after_s")
    return {"retry-after": str(seconds)} if seconds is not None else {}


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        headers = dict(scope["headers"])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _CLIENT_ID.match(offered) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "started": False, "error": None}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        metrics.ACTIVE_REQUESTS.inc()
        self.service.active_requests += 1
        self.service.request_started(request_id)
        token = current_request_id.set(request_id)
        try:
            refusal = await self._gate(scope, headers)
            if refusal is not None:
                await self._answer(scope, send_with_id, refusal, request_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except RequiemError as exc:
            if status["started"]:
                raise
            await self._answer(scope, send_with_id, exc, request_id)
        except Exception as exc:  # noqa: BLE001 - nothing escapes as a stack trace
            # Frames only, no local variables: locals would hold the request's
            # Authorization header and bodies, and secrets never reach a log line.
            logger.error(
                "request_failed",
                request_id=request_id,
                error=type(exc).__name__,
                trace="".join(traceback.format_exception(exc, limit=-12)),
            )
            if not status["started"]:
                await self._answer(
                    scope,
                    send_with_id,
                    RequiemError("internal error; see the server log"),
                    request_id,
                )
            status["error"] = type(exc).__name__
        finally:
            current_request_id.reset(token)
            metrics.ACTIVE_REQUESTS.dec()
            self.service.active_requests -= 1
            self.service.request_finished(request_id)
            self._observe(scope, status["code"], started, request_id)

    async def _gate(
        self, scope: Scope, headers: dict[bytes, bytes]
    ) -> RequiemError | None:
        """The refusal for this request before it reaches a route, if any."""
        path: str = scope["path"]
        query: bytes = scope.get("query_string", b"")
        if "\x00" in path or b"%00" in query:
            # No id, digest or filter of ours holds a NUL, and PostgreSQL text
            # cannot store one: refuse it here rather than let a query fail.
            return BadRequest("a NUL character is not allowed in a path or query")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.service.max_body_bytes:
                return BodyTooLarge(
                    f"request body of {declared} bytes is over the limit of "
                    f"{self.service.max_body_bytes}",
                    limit=self.service.max_body_bytes,
                )
        if path.startswith(OPEN_DURING_MAINTENANCE) or path.startswith(DOCS_PATHS):
            return None
        if self.service.draining:
            return ShuttingDown(
                "the server is shutting down; retry on another replica",
                retry_after_s=1,
            )
        flags = self.service.flags
        current = (
            flags.cached()
            if flags.fresh
            else await anyio.to_thread.run_sync(flags.values)
        )
        if current.get("maintenance"):
            return MaintenanceMode(
                "the service is in maintenance; retry later",
                retry_after_s=MAINTENANCE_RETRY_AFTER_S,
            )
        return None

    def _limited(self, receive: Receive) -> Receive:
        limit = self.service.max_body_bytes
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(
                        f"request body is over the limit of {limit} bytes",
                        limit=limit,
                    )
            return message

        return counting_receive

    async def _answer(
        self, scope: Scope, send: Send, exc: RequiemError, request_id: str
    ) -> None:
        scope["state"]["error_code"] = exc.code
        body = json.dumps(error_body(exc, request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in retry_after(exc).items()]
        if isinstance(exc, BodyTooLarge | ShuttingDown):
            headers.append((b"connection", b"close"))
        await send(
            {
                "type": "http.response.start",
                "status": exc.http_status,
                "headers": headers,
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _observe(
        self, scope: Scope, status: int, started: float, request_id: str
    ) -> None:
        elapsed = time.perf_counter() - started
        route = self._route(scope)
        method = scope["method"]
        metrics.REQUESTS.labels(route, method, str(status)).inc()
        metrics.REQUEST_DURATION.labels(route, method).observe(elapsed)
        code = scope.get("state", {}).get("error_code")
        if is_fault(route, status, code):
            metrics.ERRORS.labels(route, method, code or "internal_error").inc()
        logger.info(
            "request",
            method=method,
            route=route,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            request_id=request_id,
        )

    @staticmethod
    def _route(scope: Scope | None) -> str:
        route: Any = scope.get("route") if scope else None
        return getattr(route, "path", None) or "unmatched"
