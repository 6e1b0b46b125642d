"""The schema's revisions as files: their order, checksums, and where a database is.

Revision ids are ``001``, ``002`` … in one straight line (no branches), so "rollback
to 002" means what it says and ``chain()`` is simply oldest to newest.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from requiem import digest
from requiem.store.errors import DatabaseRevisionUnknown, UnknownRevision

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@functools.cache
def script() -> ScriptDirectory:
    """The parsed migrations folder (read once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def alembic_config(**attributes: Any) -> Config:
    """Alembic configuration for our folder; ``attributes`` reach env.py."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes.update(attributes)
    return config


@functools.cache
def chain() -> tuple[str, ...]:
    """Every revision id, oldest first."""
    return tuple(reversed([rev.revision for rev in script().walk_revisions()]))


def head() -> str:
    return chain()[-1]


def describe(revision: str) -> str:
    doc = script().get_revision(revision).doc or ""
    return doc.strip().splitlines()[0] if doc.strip() else revision


def checksum(revision: str) -> str:
    """BLAKE3 of the revision's file, as it is now."""
    return digest.of_file(script().get_revision(revision).path)


def known(revision: str) -> str:
    if revision not in chain():
        msg = f"unknown revision {revision!r} (known: {', '.join(chain())})"
        raise UnknownRevision(msg, revision=revision)
    return revision


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at; None for an empty database."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None and revision not in chain():
        msg = (
            f"the database is at revision {revision!r}, which this version of"
            " Requiem does not know (newer code migrated it?)"
        )
        raise DatabaseRevisionUnknown(msg, revision=revision)
    return revision


def position(revision: str | None) -> int:
    """Index in the chain; -1 for an empty database."""
    return -1 if revision is None else chain().index(revision)
