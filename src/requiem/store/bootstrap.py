"""Bring a database to the current schema before the service or a command uses it."""

from __future__ import annotations

from sqlalchemy import Engine

from requiem.store.models import Base


def ensure_schema(engine: Engine) -> None:
    """Create every table the code expects, if it is missing."""
    Base.metadata.create_all(engine)
