"""Every setting Requiem reads from the environment, in one table.

The table is the single source for three things: the values the code uses
(:func:`load`), what ``requiem env verify`` checks, and the README's configuration
section. A setting marked ``secret`` is never printed, only said to be set or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from requiem.errors import ConfigError

PROFILES = ("development", "staging", "production")
DEV_SECRET_KEY = "requiem-development-secret-do-not-use-in-production"


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    kind: str  # str, int, float, bool, path, url, choice
    help: str
    secret: bool = False
    choices: tuple[str, ...] = ()


TABLE: tuple[Setting, ...] = (
    Setting(
        "REQUIEM_HOME", "./.requiem", "path", "State directory: database, CAS, keys."
    ),
    Setting("REQUIEM_CAS_DIR", None, "path", "CAS root (default $REQUIEM_HOME/cas)."),
    Setting(
        "REQUIEM_CAS_COMPRESSION",
        "auto",
        "choice",
        "zstd for blobs it shrinks (auto), always (zstd) or never (none).",
        choices=("auto", "zstd", "none"),
    ),
    Setting("REQUIEM_CAS_ZSTD_LEVEL", "3", "int", "zstd level for CAS blobs (1-19)."),
    Setting(
        "DATABASE_URL",
        None,
        "url",
        "postgresql://… or sqlite:///… (default sqlite at $REQUIEM_HOME/requiem.db).",
        secret=True,
    ),
    Setting(
        "REQUIEM_ENV",
        "development",
        "choice",
        "Profile: development, staging or production.",
        choices=PROFILES,
    ),
    Setting(
        "REQUIEM_ALLOW_SQLITE_IN_PRODUCTION",
        "false",
        "bool",
        "Let the production profile run on SQLite.",
    ),
    Setting(
        "REQUIEM_SECRET_KEY",
        None,
        "str",
        "Server secret (API key hashing pepper). Required in production.",
        secret=True,
    ),
    Setting("REQUIEM_DB_POOL_SIZE", "5", "int", "PostgreSQL pool size."),
    Setting("REQUIEM_DB_MAX_OVERFLOW", "10", "int", "PostgreSQL pool overflow."),
    Setting(
        "REQUIEM_DB_POOL_TIMEOUT", "30", "float", "Seconds to wait for a connection."
    ),
    Setting(
        "REQUIEM_DB_STATEMENT_TIMEOUT_MS",
        "30000",
        "int",
        "PostgreSQL statement timeout for service queries (0: none).",
    ),
    Setting(
        "REQUIEM_LOG_LEVEL",
        "info",
        "choice",
        "Log level of `serve`; other commands log warnings only unless this is set.",
        choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "REQUIEM_LOG_FORMAT",
        "console",
        "choice",
        "Log lines as console text or JSON.",
        choices=("console", "json"),
    ),
    Setting("REQUIEM_URL", "http://127.0.0.1:8080", "url", "Server the CLI talks to."),
    Setting("REQUIEM_API_KEY", None, "str", "API key the CLI sends.", secret=True),
    Setting("REQUIEM_HOST", "127.0.0.1", "str", "Address `requiem serve` binds."),
    Setting("REQUIEM_PORT", "8080", "int", "Port `requiem serve` binds."),
    Setting("REQUIEM_WORKERS", "1", "int", "Server worker processes."),
    Setting(
        "REQUIEM_SHUTDOWN_GRACE_S",
        "30",
        "float",
        "Seconds in-flight work gets to finish after SIGTERM.",
    ),
    Setting(
        "REQUIEM_MAX_CONCURRENT_EXECUTIONS",
        "4",
        "int",
        "Executions run at once per server process.",
    ),
    Setting(
        "REQUIEM_QUEUE_TIMEOUT_MS",
        "2000",
        "int",
        "How long an execution waits for a slot before 429.",
    ),
    Setting(
        "REQUIEM_MAX_BODY_BYTES", "2097152", "int", "Largest accepted request body."
    ),
    Setting(
        "REQUIEM_COST_PER_SECOND",
        "0.0001",
        "float",
        "Cost charged per second of execution (cache hits are free).",
    ),
    Setting(
        "REQUIEM_SOURCE_DATE_EPOCH",
        "315532800",
        "int",
        "The fixed clock children see (default 1980-01-01T00:00:00Z).",
    ),
    Setting("REQUIEM_FAKETIME_LIB", None, "path", "libfaketime.so.1 (found if unset)."),
    Setting(
        "REQUIEM_BWRAP", None, "path", "bubblewrap binary (found on PATH if unset)."
    ),
    Setting(
        "REQUIEM_WORK_DIR",
        "/tmp/requiem-work",
        "path",
        "Scratch workspaces of runs (a fixed path, so runs see the same paths).",
    ),
    Setting(
        "REQUIEM_AUDIT_CHECKPOINT_EVERY",
        "1000",
        "int",
        "Sign an audit checkpoint after this many entries.",
    ),
    Setting(
        "REQUIEM_AUDIT_CHECKPOINT_INTERVAL_S",
        "60",
        "float",
        "…or after this many seconds with new entries.",
    ),
    Setting(
        "REQUIEM_AUDIT_KEY_FILE",
        None,
        "path",
        "Ed25519 audit checkpoint key (default $REQUIEM_HOME/keys/audit_ed25519.pem).",
        secret=True,
    ),
)

BY_NAME = {s.name: s for s in TABLE}


def _parse(setting: Setting, raw: str) -> object:
    """Typed value of ``raw`` for ``setting``; ConfigError naming it when malformed."""
    kind = setting.kind
    shown = "<secret>" if setting.secret else repr(raw)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        msg = f"{setting.name}={shown} is not a number"
        raise ConfigError(msg, setting=setting.name) from exc
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        msg = f"{setting.name}={shown} is not a boolean (true/false)"
        raise ConfigError(msg, setting=setting.name)
    if kind == "choice" and raw not in setting.choices:
        msg = f"{setting.name}={shown} is not one of {', '.join(setting.choices)}"
        raise ConfigError(msg, setting=setting.name)
    if kind == "url":
        parts = urlsplit(raw)
        if not parts.scheme or (
            parts.scheme not in ("sqlite", "sqlite+pysqlite") and not parts.netloc
        ):
            msg = f"{setting.name} is not a well-formed URL"
            raise ConfigError(msg, setting=setting.name)
    return raw


@dataclass(frozen=True)
class Settings:
    """Typed settings; build with :func:`load`."""

    raw: Mapping[str, str] = field(repr=False)

    def get(self, name: str) -> object:
        setting = BY_NAME[name]
        value = self.raw.get(name)
        if value is None or value == "":
            if setting.default is None:
                return None
            value = setting.default
        return _parse(setting, value)

    def is_set(self, name: str) -> bool:
        return bool(self.raw.get(name))

    @property
    def home(self) -> Path:
        return Path(str(self.get("REQUIEM_HOME"))).expanduser().resolve()

    @property
    def cas_dir(self) -> Path:
        explicit = self.get("REQUIEM_CAS_DIR")
        if explicit:
            return Path(str(explicit)).expanduser().resolve()
        return self.home / "cas"

    @property
    def database_url(self) -> str:
        explicit = self.get("DATABASE_URL")
        if explicit:
            return str(explicit)
        return f"sqlite:///{self.home / 'requiem.db'}"

    @property
    def profile(self) -> str:
        return str(self.get("REQUIEM_ENV"))

    @property
    def secret_key(self) -> str:
        value = self.get("REQUIEM_SECRET_KEY")
        return str(value) if value else DEV_SECRET_KEY

    @property
    def audit_key_file(self) -> Path:
        explicit = self.get("REQUIEM_AUDIT_KEY_FILE")
        if explicit:
            return Path(str(explicit)).expanduser().resolve()
        return self.home / "keys" / "audit_ed25519.pem"

    def int(self, name: str) -> int:
        return int(self.get(name))  # type: ignore[arg-type]

    def float(self, name: str) -> float:
        return float(self.get(name))  # type: ignore[arg-type]

    def bool(self, name: str) -> bool:
        return bool(self.get(name))


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (the process environment by default)."""
    source = os.environ if environ is None else environ
    wanted = {
        k: v for k, v in source.items() if k in BY_NAME or k.startswith("REQUIEM_")
    }
    return Settings(raw=dict(wanted))


def unknown_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``REQUIEM_*`` variables set in the environment that no setting reads (typos)."""
    source = os.environ if environ is None else environ
    ignored_prefixes = ("REQUIEM_TEST_",)
    return sorted(
        name
        for name in source
        if name.startswith("REQUIEM_")
        and name not in BY_NAME
        and not name.startswith(ignored_prefixes)
    )
