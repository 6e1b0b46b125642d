"""Authentication for routes: ``Depends(require_role("operator"))`` → a Principal.

A request proves who it is with ``Authorization: Bearer rqm_…``. The tenant and the
role come from the key alone; nothing the client sends can choose another tenant.
Roles are ordered viewer < operator < admin: viewers read, operators also execute,
admins also change flags, tenants and keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from requiem.api.service import get_service
from requiem.control.credentials import Principal, check_role, hash_key, require
from requiem.errors import Unauthenticated

__all__ = ["Admin", "Operator", "Principal", "Viewer", "bearer", "require_role"]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer rqm_…`.",
)


def require_role(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the caller and demands ``role`` or above."""
    check_role(role)

    async def authenticated(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> Principal:
        service = get_service(request)
        request_id = getattr(request.state, "request_id", None)
        source_ip = request.client.host if request.client else None

        if credentials is None or not credentials.credentials:
            exc = Unauthenticated(
                "no API key: send the header Authorization: Bearer rqm_…"
            )
            await anyio.to_thread.run_sync(
                service.audit_failed_auth, exc, request_id, source_ip
            )
            raise exc

        presented = credentials.credentials
        principal = service.keys.get(
            hash_key(service.secret_key, presented)
        ) or await anyio.to_thread.run_sync(
            service.authenticate, presented, request_id, source_ip
        )

        require(principal, role)
        request.state.principal = principal
        return principal

    authenticated.__name__ = f"require_{role}"
    return authenticated


Viewer = Annotated[Principal, Depends(require_role("viewer"))]
Operator = Annotated[Principal, Depends(require_role("operator"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
