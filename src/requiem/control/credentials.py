"""API keys: generated once, stored only as an HMAC, checked in constant time.

A key reads ``rqm_`` followed by 43 URL-safe characters (256 random bits). The
database keeps ``HMAC-SHA256(secret_key, key)`` — the server secret is a pepper, so a
stolen table alone cannot be used to test guesses — and a short display prefix so a
person can tell keys apart. The tenant and role come from the key row, never from
anything else the client sends.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from requiem.control import audit, tenants
from requiem.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from requiem.store.models import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "rqm_"
DISPLAY_CHARS = 12
ROLES = ("viewer", "operator", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}


class InvalidApiKey(Unauthenticated):
    code = "invalid_api_key"


class ApiKeyRevoked(Unauthenticated):
    code = "api_key_revoked"


class ApiKeyExpired(Unauthenticated):
    code = "api_key_expired"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"


class UnknownRole(InvalidInput):
    code = "unknown_role"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and role carried by the presented key."""

    tenant_id: str
    key_id: str
    role: str
    is_operator: bool
    tenant_status: str = "active"

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"

    def allows(self, role: str) -> bool:
        """True when this principal's role is ``role`` or above it."""
        return _RANK[self.role] >= _RANK[role]


def check_role(role: str) -> str:
    if role not in _RANK:
        msg = f"role {role!r} is not one of {', '.join(ROLES)}"
        raise UnknownRole(msg, role=role)
    return role


def require(principal: Principal, role: str) -> None:
    """Raise ``forbidden`` unless ``principal`` holds ``role`` or above."""
    if not principal.allows(role):
        msg = f"this needs the {role} role; the key has {principal.role}"
        raise Forbidden(msg, needed=role, role=principal.role)


def hash_key(secret_key: str, key: str) -> str:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).hexdigest()


def generate(
    session: Session,
    secret_key: str,
    *,
    tenant: str,
    role: str,
    name: str,
    expires_at: datetime | None = None,
    actor: str | None = None,
    source: str = "cli",
    request_id: str | None = None,
) -> tuple[str, ApiKey]:
    """A new key for ``tenant`` (id or name): the key text, shown once, and its row."""
    check_role(role)
    owner = tenants.find(session, tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)

    row = ApiKey(
        id=new_id("key"),
        tenant_id=owner.id,
        name=name,
        role=role,
        prefix=key[:DISPLAY_CHARS],
        key_hash=hash_key(secret_key, key),
        created_by=actor,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()

    audit.record(
        session,
        "api_key.generate",
        actor=actor,
        tenant_id=owner.id,
        target=row.id,
        source=source,
        request_id=request_id,
        details={"name": name, "role": role, "prefix": row.prefix},
    )
    return key, row


def authenticate(session: Session, secret_key: str, presented: str) -> Principal:
    """The principal of a valid key; ``invalid_api_key``/``revoked``/``expired``."""
    if not presented.startswith(KEY_PREFIX):
        raise InvalidApiKey("the API key is not a Requiem key (rqm_…)")
    wanted = hash_key(secret_key, presented)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == wanted))
    # The lookup is by an HMAC the caller cannot steer; compare again in constant
    # time so that no code path compares secret material byte by byte.
    if row is None or not hmac.compare_digest(row.key_hash, wanted):
        raise InvalidApiKey("the API key is not valid")
    if row.revoked_at is not None:
        raise ApiKeyRevoked("the API key was revoked", key_id=row.id)
    if row.expires_at is not None and _aware(row.expires_at) <= utcnow():
        raise ApiKeyExpired("the API key has expired", key_id=row.id)

    tenant = session.get(Tenant, row.tenant_id)
    if tenant is None:
        raise InvalidApiKey("the API key's tenant no longer exists")
    return Principal(
        tenant_id=tenant.id,
        key_id=row.id,
        role=row.role,
        is_operator=tenant.is_operator,
        tenant_status=tenant.status,
    )


def revoke(
    session: Session,
    key_id: str,
    *,
    actor: str | None = None,
    source: str = "cli",
    request_id: str | None = None,
) -> ApiKey:
    """Mark a key revoked (idempotent: a second revoke keeps the first time)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise ApiKeyNotFound(f"no API key with id {key_id!r}", key_id=key_id)
    already = row.revoked_at is not None
    if not already:
        row.revoked_at = utcnow()

    audit.record(
        session,
        "api_key.revoke",
        actor=actor,
        tenant_id=row.tenant_id,
        target=row.id,
        source=source,
        request_id=request_id,
        details={"already_revoked": already},
    )
    return row


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        query = query.where(ApiKey.tenant_id == tenants.find(session, tenant).id)
    return list(session.scalars(query))


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def as_dict(row: ApiKey) -> dict[str, object]:
    """A key's details for people: never the key, never its hash."""

    def when(moment: datetime | None) -> str | None:
        return _aware(moment).isoformat() if moment else None

    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and _aware(row.expires_at) <= utcnow():
        state = "expired"
    else:
        state = "active"
    return {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "name": row.name,
        "role": row.role,
        "prefix": row.prefix,
        "state": state,
        "created_at": when(row.created_at),
        "expires_at": when(row.expires_at),
        "revoked_at": when(row.revoked_at),
    }
