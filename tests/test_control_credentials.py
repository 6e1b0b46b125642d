"""API keys and tenants on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from control_fixtures import migrated_sessions  # noqa: F401 - the sessions fixture
from requiem import errors
from requiem.control import credentials, tenants
from requiem.store.db import transaction
from requiem.store.models import ApiKey, AuditPending, utcnow

SECRET = "test-pepper"


def new_key(sessions, role: str = "operator", **kwargs) -> tuple[str, ApiKey]:
    with transaction(sessions) as session:
        try:
            tenants.find(session, "acme")
        except tenants.TenantNotFound:
            tenants.create(session, "acme", actor="test")
    with transaction(sessions) as session:
        return credentials.generate(
            session, SECRET, tenant="acme", role=role, name="ci", **kwargs
        )


def test_a_key_is_stored_only_as_its_hmac(sessions):
    key, row = new_key(sessions)

    with sessions() as session:
        stored = session.get(ApiKey, row.id)
        audit_rows = [
            json.loads(r.entry) for r in session.scalars(select(AuditPending))
        ]

    assert key.startswith("rqm_") and len(key) == 47
    assert stored.key_hash == credentials.hash_key(SECRET, key) != key
    assert key not in stored.key_hash and stored.prefix == key[:12]
    assert ["tenant.create", "api_key.generate"] == [
        a["action"] for a in audit_rows if not a["action"].startswith("db.")
    ]
    assert key not in json.dumps(audit_rows)


def test_a_valid_key_gives_its_tenant_and_role(sessions):
    key, row = new_key(sessions, role="viewer")

    with sessions() as session:
        principal = credentials.authenticate(session, SECRET, key)

    assert (principal.key_id, principal.role) == (row.id, "viewer")
    assert principal.tenant_id == row.tenant_id
    assert principal.allows("viewer") and not principal.allows("operator")


def test_wrong_revoked_and_expired_keys_each_have_their_code(sessions):
    key, row = new_key(sessions)
    expired, _ = new_key(sessions, expires_at=utcnow() - timedelta(seconds=1))
    with transaction(sessions) as session:
        credentials.revoke(session, row.id, actor="test")

    with sessions() as session:
        with pytest.raises(credentials.InvalidApiKey):
            credentials.authenticate(session, SECRET, key + "x")
        with pytest.raises(credentials.InvalidApiKey):
            credentials.authenticate(session, "another-pepper", key)
        with pytest.raises(credentials.ApiKeyRevoked) as revoked:
            credentials.authenticate(session, SECRET, key)
        with pytest.raises(credentials.ApiKeyExpired):
            credentials.authenticate(session, SECRET, expired)

    assert (revoked.value.code, revoked.value.http_status) == ("api_key_revoked", 401)


def test_unknown_role_key_id_and_tenant_are_refused(sessions):
    with pytest.raises(credentials.UnknownRole):
        new_key(sessions, role="root")
    with transaction(sessions) as session, pytest.raises(credentials.ApiKeyNotFound):
        credentials.revoke(session, "key_missing")
    with transaction(sessions) as session, pytest.raises(tenants.TenantNotFound):
        credentials.generate(session, SECRET, tenant="nobody", role="admin", name="x")


def test_tenant_names_are_unique_and_checked(sessions):
    with transaction(sessions) as session:
        tenants.create(session, "acme")

    with transaction(sessions) as session, pytest.raises(tenants.TenantExists):
        tenants.create(session, "acme")
    with transaction(sessions) as session, pytest.raises(tenants.InvalidTenantName):
        tenants.create(session, "../etc")


def test_roles_forbid_what_they_do_not_allow():
    viewer = credentials.Principal("t_1", "key_1", "viewer", is_operator=False)

    credentials.require(viewer, "viewer")
    with pytest.raises(errors.Forbidden) as refused:
        credentials.require(viewer, "admin")

    assert refused.value.code == "forbidden"
