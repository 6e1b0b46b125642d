"""Tenants and keys made in-process against a test server's database (fast setup)."""

from __future__ import annotations

from decimal import Decimal

from requiem import settings
from requiem.control import credentials, tenants
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory, transaction
from requiem.store.models import Budget


def _factory(env: dict[str, str]):
    config = settings.load(env)
    engine = make_engine(config)
    ensure_schema(engine)
    return config, engine, session_factory(engine)


def make_key(
    env: dict[str, str], tenant: str, role: str, *, operator: bool = False
) -> str:
    """A new key for ``tenant`` (created first if it does not exist yet)."""
    return make_key_with_id(env, tenant, role, operator=operator)[0]


def make_key_with_id(
    env: dict[str, str], tenant: str, role: str, *, operator: bool = False
) -> tuple[str, str]:
    """A new key for ``tenant`` and the key's id."""
    config, engine, factory = _factory(env)
    try:
        with transaction(factory) as session:
            try:
                tenants.find(session, tenant)
            except tenants.TenantNotFound:
                tenants.create(session, tenant, is_operator=operator, actor="test")
        with transaction(factory) as session:
            key, row = credentials.generate(
                session,
                config.secret_key,
                tenant=tenant,
                role=role,
                name=f"{tenant}-{role}",
                actor="test",
            )
        return key, row.id
    finally:
        engine.dispose()


def set_budget(env: dict[str, str], tenant: str, limit: str) -> None:
    _config, engine, factory = _factory(env)
    try:
        with transaction(factory) as session:
            owner = tenants.find(session, tenant)
            session.merge(Budget(tenant_id=owner.id, limit_amount=Decimal(limit)))
    finally:
        engine.dispose()


def set_tenant_status(env: dict[str, str], tenant: str, status: str) -> None:
    _config, engine, factory = _factory(env)
    try:
        with transaction(factory) as session:
            tenants.set_status(session, tenant, status, reason="test", actor="test")
    finally:
        engine.dispose()
