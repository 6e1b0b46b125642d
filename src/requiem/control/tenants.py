"""Tenants: the unit of isolation. Every execution, object and cost belongs to one."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from requiem.control import audit
from requiem.errors import Conflict, Forbidden, InvalidInput, NotFound
from requiem.store.models import Tenant, new_id, utcnow

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class TenantExists(Conflict):
    code = "tenant_exists"


class InvalidTenantName(InvalidInput):
    code = "invalid_tenant_name"


class TenantSuspended(Forbidden):
    code = "tenant_suspended"


def create(
    session: Session,
    name: str,
    *,
    is_operator: bool = False,
    actor: str | None = None,
    source: str = "cli",
    request_id: str | None = None,
) -> Tenant:
    """A new active tenant named ``name`` (letters, digits, ``.``, ``_``, ``-``)."""
    if not _NAME.match(name):
        msg = f"tenant name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
        raise InvalidTenantName(msg)
    if session.scalar(select(Tenant.id).where(Tenant.name == name)):
        raise TenantExists(f"a tenant named {name!r} already exists", name=name)

    tenant = Tenant(id=new_id("t"), name=name, status="active", is_operator=is_operator)
    session.add(tenant)
    session.flush()

    audit.record(
        session,
        "tenant.create",
        actor=actor,
        tenant_id=tenant.id,
        target=tenant.id,
        source=source,
        request_id=request_id,
        details={"name": name, "is_operator": is_operator},
    )
    return tenant


def find(session: Session, id_or_name: str) -> Tenant:
    """The tenant with this id or, failing that, this name."""
    tenant = session.get(Tenant, id_or_name)
    if tenant is None:
        tenant = session.scalar(select(Tenant).where(Tenant.name == id_or_name))
    if tenant is None:
        raise TenantNotFound(f"no tenant {id_or_name!r}", tenant=id_or_name)
    return tenant


def list_all(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at)))


def set_status(
    session: Session,
    id_or_name: str,
    status: str,
    *,
    reason: str | None = None,
    actor: str | None = None,
    source: str = "cli",
    request_id: str | None = None,
) -> Tenant:
    """Suspend (``status="suspended"``) or reactivate (``"active"``) a tenant."""
    tenant = find(session, id_or_name)
    old = tenant.status
    tenant.status = status
    tenant.suspended_reason = reason if status == "suspended" else None
    tenant.updated_at = utcnow()

    audit.record(
        session,
        "tenant.suspend" if status == "suspended" else "tenant.activate",
        actor=actor,
        tenant_id=tenant.id,
        target=tenant.id,
        source=source,
        request_id=request_id,
        details={"old": old, "new": status, "reason": reason},
    )
    return tenant


def as_dict(tenant: Tenant) -> dict[str, object]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "status": tenant.status,
        "suspended_reason": tenant.suspended_reason,
        "is_operator": tenant.is_operator,
        "created_at": tenant.created_at.isoformat() if tenant.created_at else None,
    }


def require_active(session: Session, tenant_id: str) -> Tenant:
    """The tenant, if it exists and is not suspended (what any write needs)."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFound("the API key's tenant no longer exists")
    if tenant.status != "active":
        msg = f"tenant {tenant.id} is suspended"
        raise TenantSuspended(msg, reason=tenant.suspended_reason)
    return tenant
