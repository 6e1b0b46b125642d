"""Profile rules (``REQUIEM_ENV``): what production refuses to start with."""

from __future__ import annotations

from requiem.settings import DEV_SECRET_KEY, Settings
from requiem.store.db import is_sqlite
from requiem.store.errors import DefaultSecretInProduction, SqliteInProduction


def check(settings: Settings) -> None:
    """Raise a ConfigError subclass when the profile forbids this configuration."""
    if settings.profile != "production":
        return
    if is_sqlite(settings.database_url) and not settings.bool(
        "REQUIEM_ALLOW_SQLITE_IN_PRODUCTION"
    ):
        msg = (
            "the production profile refuses SQLite: set DATABASE_URL to PostgreSQL "
            "or REQUIEM_ALLOW_SQLITE_IN_PRODUCTION=true"
        )
        raise SqliteInProduction(msg)
    key = settings.get("REQUIEM_SECRET_KEY")
    if not key or key == DEV_SECRET_KEY:
        state = "unset" if not key else "the development default"
        msg = f"the production profile refuses REQUIEM_SECRET_KEY {state}: set a secret"
        raise DefaultSecretInProduction(msg)
