"""The FastAPI application: ``create_app(settings)`` builds one, wired and ready.

Routers are listed in :data:`ROUTERS`; adding a router is one line there. Every
error, FastAPI's own included, leaves in the one shape of :mod:`requiem.api.responses`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from requiem import __version__
from requiem import settings as settings_module
from requiem.api import (
    metrics,
    routes_admin,
    routes_audit,
    routes_cas,
    routes_executions,
    routes_health,
)
from requiem.api.bodies import BODY_COMPONENTS
from requiem.api.middleware import ServiceMiddleware, retry_after
from requiem.api.responses import (
    BadRequest,
    BodyTooLarge,
    ErrorBody,
    MethodNotAllowed,
    UnknownParameter,
    error_response,
)
from requiem.api.service import Service
from requiem.errors import JsonParseError, NotFound, RequiemError
from requiem.settings import Settings
from requiem.store.errors import DatabaseUnreachable

ROUTERS = [
    routes_health.router,
    routes_executions.router,
    routes_cas.router,
    routes_admin.router,
    routes_audit.router,
]

# Statuses any operation can answer, whatever its own list says.
COMMON_ERROR_STATUSES = ("400", "413", "500", "503")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    await anyio.to_thread.run_sync(service.start)
    app.state.audit = service.audit_service
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(service.stop)


def create_app(settings: Settings) -> FastAPI:
    """A new application for ``settings`` with its own database engine and CAS."""
    service = Service(settings)
    app = FastAPI(
        title="Requiem",
        version=__version__,
        summary="Deterministic, provable command execution for many tenants.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service

    strict_query = [Depends(reject_unknown_query)]
    for router in ROUTERS:
        # Health is polled every second by probes: keep its path as short as it goes.
        checks = [] if router is routes_health.router else strict_query
        app.include_router(router, dependencies=checks)

    app.add_exception_handler(RequiemError, _requiem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for database_error in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(database_error, _database_error)
    app.add_middleware(ServiceMiddleware, service=service)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    metrics.install_collector(
        metrics.ServiceCollector(service.cas_totals, service.flags.cached)
    )
    return app


async def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not declare is a mistake: 400, not ignored."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    allowed = _declared_query(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        shown = unknown[0][:64]
        raise UnknownParameter(f"unknown query parameter {shown!r}", parameter=shown)


def _declared_query(dependant: Any) -> frozenset[str]:
    cached = _QUERY_NAMES.get(id(dependant))
    if cached is None:
        names = {field.alias for field in dependant.query_params}
        for sub in dependant.dependencies:
            names |= _declared_query(sub)
        cached = _QUERY_NAMES[id(dependant)] = frozenset(names)
    return cached


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def app_from_environment() -> FastAPI:
    """The app for the current environment (uvicorn's factory for ``serve``)."""
    return create_app(settings_module.load())


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _requiem_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, RequiemError)
    request.state.error_code = exc.code
    return error_response(exc, _request_id(request), headers=retry_after(exc))


async def _http_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, StarletteHTTPException)
    error: RequiemError
    if exc.status_code == 404:
        error = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}"
        )
    elif exc.status_code == 413:
        error = BodyTooLarge(str(exc.detail))
    else:
        error = BadRequest(str(exc.detail))
    request.state.error_code = error.code
    headers = dict(exc.headers or {})
    return error_response(error, _request_id(request), headers=headers or None)


async def _database_error(request: Request, exc: Exception) -> Any:
    error = DatabaseUnreachable(
        f"the database did not answer ({type(exc).__name__}); retry shortly",
        retry_after_s=1,
    )
    request.state.error_code = error.code
    return error_response(error, _request_id(request), headers=retry_after(error))


async def _validation_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    error: RequiemError
    if any(p.get("type") == "json_invalid" for p in problems):
        error = JsonParseError("request body is not valid JSON")
    else:
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid value')}"
        error = BadRequest(message, problems=[_plain(p) for p in problems[:10]])
    request.state.error_code = error.code
    return error_response(error, _request_id(request))


def _plain(problem: dict[str, Any]) -> dict[str, Any]:
    """A validation problem without the offending input (it may hold a secret)."""
    return {
        "loc": [str(part) for part in problem.get("loc", ())],
        "msg": str(problem.get("msg", "")),
        "type": str(problem.get("type", "")),
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with our error shape in place of its 422 everywhere."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, body in BODY_COMPONENTS.items():
        components.setdefault(name, body)
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    if "ErrorBody" not in components:
        components.update(
            ErrorBody.model_json_schema(
                ref_template="#/components/schemas/{model}"
            ).pop("$defs", {})
        )
        components["ErrorBody"] = ErrorBody.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        components["ErrorBody"].pop("$defs", None)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in COMMON_ERROR_STATUSES:
                responses.setdefault(
                    status,
                    {
                        "description": "An error in the one error shape.",
                        "content": {"application/json": {"schema": ref}},
                    },
                )
    app.openapi_schema = schema
    return schema
