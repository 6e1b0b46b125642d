"""``requiem env verify``: is every setting well-formed, and is what it names there?

Every row of ``settings.TABLE`` is checked: set or defaulted, parsed by its kind, held
to its range, and, where it names something reachable, reached: the database with a
real connection and a short timeout, ``REQUIEM_URL`` with one request (a warning
only: the server may simply not be started yet). Secrets are shown as set or unset,
never by value; a ``DATABASE_URL`` is shown with its password masked.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from requiem import settings
from requiem.cli import output
from requiem.cli.client import ApiClient
from requiem.errors import InvalidInput, RequiemError
from requiem.store import db, profile

env_app = typer.Typer(
    name="env", help="The environment Requiem runs in.", no_args_is_help=True
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

DB_CONNECT_TIMEOUT_S = 3
SERVER_TIMEOUT_S = 2.0
# Bounds beyond each setting's kind: (lowest, highest), None for open.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "REQUIEM_CAS_ZSTD_LEVEL": (1, 19),
    "REQUIEM_DB_POOL_SIZE": (1, None),
    "REQUIEM_DB_MAX_OVERFLOW": (0, None),
    "REQUIEM_DB_POOL_TIMEOUT": (0, None),
    "REQUIEM_DB_STATEMENT_TIMEOUT_MS": (0, None),
    "REQUIEM_PORT": (1, 65535),
    "REQUIEM_WORKERS": (1, None),
    "REQUIEM_SHUTDOWN_GRACE_S": (0, None),
    "REQUIEM_MAX_CONCURRENT_EXECUTIONS": (1, None),
    "REQUIEM_QUEUE_TIMEOUT_MS": (0, None),
    "REQUIEM_MAX_BODY_BYTES": (1, None),
    "REQUIEM_AUDIT_CHECKPOINT_EVERY": (1, None),
    "REQUIEM_AUDIT_CHECKPOINT_INTERVAL_S": (0, None),
}
# Paths that must already exist when set (tools Requiem runs, not state it makes).
MUST_EXIST = ("REQUIEM_FAKETIME_LIB", "REQUIEM_BWRAP")


class EnvInvalid(InvalidInput):
    code = "env_invalid"


def register(app: typer.Typer) -> None:
    app.add_typer(env_app)


@env_app.command("verify")
def verify(as_json: JsonFlag = False) -> None:
    """Check every setting; exit 2 (env_invalid) if one is malformed or the
    database cannot be reached."""
    config = settings.load()
    rows = [_check(config, setting) for setting in settings.TABLE]
    warnings = [
        f"unknown variable {name} (a typo?)" for name in settings.unknown_names()
    ]
    errors = [f"{r['name']}: {r['problem']}" for r in rows if r["status"] == "error"]
    warnings += [
        f"{r['name']}: {r['problem']}" for r in rows if r["status"] == "warning"
    ]
    try:
        profile.check(config)
    except RequiemError as exc:
        errors.append(f"profile {config.get('REQUIEM_ENV')}: {exc.message}")

    if as_json:
        output.print_json(
            {"ok": not errors, "settings": rows, "warnings": warnings, "errors": errors}
        )
    else:
        output.table(
            None,
            ["setting", "source", "value", "check"],
            [[r["name"], r["source"], r["value"], r["status"]] for r in rows],
        )
        for warning in warnings:
            output.note(f"warning: {warning}")
    if errors:
        fail_after_report(EnvInvalid("; ".join(errors)))


def fail_after_report(error: RequiemError) -> None:
    """End with ``error``'s line and exit code after a report was already printed.

    Raising the error would make ``--json`` print a second document on stdout.
    """
    sys.stderr.write(f"requiem: error[{error.code}]: {error.message}\n")
    raise typer.Exit(error.exit_code)


def _check(config: settings.Settings, setting: settings.Setting) -> dict[str, Any]:
    name = setting.name
    raw = config.raw.get(name)
    source = "set" if raw else ("default" if setting.default is not None else "unset")
    row: dict[str, Any] = {
        "name": name,
        "source": source,
        "value": _shown(setting, raw),
        "status": "ok",
        "problem": None,
    }
    try:
        value = config.get(name)
        problem, severity = _reach(config, setting, value)
    except RequiemError as exc:
        problem, severity = exc.message, "error"
    if problem:
        row["status"], row["problem"] = severity, problem
    return row


def _shown(setting: settings.Setting, raw: str | None) -> str:
    if setting.name == "DATABASE_URL":
        return db.masked(raw) if raw else "(sqlite in REQUIEM_HOME)"
    if setting.secret:
        return "set" if raw else "unset"
    if raw:
        return raw
    return setting.default if setting.default is not None else "-"


def _reach(
    config: settings.Settings, setting: settings.Setting, value: object
) -> tuple[str | None, str]:
    """A problem with ``value`` beyond its kind, and how bad it is."""
    name = setting.name
    bounds = RANGES.get(name)
    if bounds and value is not None:
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            shown = ["…" if bound is None else str(bound) for bound in bounds]
            return f"{value} is outside {shown[0]}..{shown[1]}", "error"
    if name == "DATABASE_URL":
        return _reach_database(config), "error"
    if name == "REQUIEM_URL":
        client = ApiClient.from_settings(config, timeout=SERVER_TIMEOUT_S)
        if not client.reachable():
            return f"no Requiem server answers at {value}", "warning"
    if name in MUST_EXIST and value and not Path(str(value)).exists():
        return f"{value} does not exist", "error"
    return None, "ok"


def _reach_database(config: settings.Settings) -> str | None:
    """Why the configured database cannot be reached, or None."""
    url = db.parse_url(config.database_url)
    if url.get_backend_name() == "sqlite":
        return _reach_sqlite(Path(url.database or ""))
    engine = create_engine(
        url,
        poolclass=NullPool,
        connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S},
    )
    try:
        db.ping(engine)
    except RequiemError as exc:
        return exc.message
    finally:
        engine.dispose()
    return None


def _reach_sqlite(path: Path) -> str | None:
    if path.is_file():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            return f"SQLite file {path} cannot be read: {exc}"
        return None
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        return f"SQLite file {path} does not exist and {folder} is not writable"
    return None
