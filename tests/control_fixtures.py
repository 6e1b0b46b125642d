"""A migrated database on SQLite and PostgreSQL for the control-layer tests."""

from __future__ import annotations

import pytest

from requiem import settings
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory


@pytest.fixture(name="sessions")
def migrated_sessions(database_url: str):
    """Sessions on a migrated database (each test runs on SQLite and PostgreSQL)."""
    engine = make_engine(settings.load({}), database_url)
    ensure_schema(engine)
    yield session_factory(engine)
    engine.dispose()
