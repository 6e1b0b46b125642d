"""The migration runner's own tables: its lock, its run log, each revision's state.

They live beside Alembic's ``alembic_version`` rather than in a revision, because the
runner needs them before the first revision runs (to lock, and to log that run).

``requiem_migration_runs`` is the log: one row per ``db migrate``, ``rollback``,
``resolve`` or ``unlock`` with who, where, when, from → to, how long, the result and
the checksum of each revision file it ran. ``requiem_migration_revisions`` is the
state: for each revision that is applied or failed, the checksum it was applied with,
when, how long it took, and who resolved it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)

from requiem import log
from requiem.store.models import utcnow
from requiem.store.revisions import checksum

BOOKKEEPING = MetaData()
TZ = DateTime(timezone=True)
logger = log.get("requiem.store.history")

lock_table = Table(
    "requiem_migration_lock",
    BOOKKEEPING,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("actor", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("command", String(32), nullable=False),
    Column("acquired_at", TZ, nullable=False),
)

runs_table = Table(
    "requiem_migration_runs",
    BOOKKEEPING,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("command", String(32), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", TZ, nullable=False),
    Column("finished_at", TZ),
    Column("from_revision", String(32)),
    Column("to_revision", String(32)),
    Column("duration_ms", Integer),
    Column("result", String(16), nullable=False),  # running|succeeded|failed|…
    Column("error", Text),
    Column("plan", Text, nullable=False),  # JSON list of revision ids, in order
    Column("steps", Text, nullable=False),  # JSON list of what each step did
)

revisions_table = Table(
    "requiem_migration_revisions",
    BOOKKEEPING,
    Column("revision", String(32), primary_key=True),
    Column("status", String(16), nullable=False),  # applied|failed
    Column("checksum", String(64), nullable=False),
    Column("applied_at", TZ),
    Column("duration_ms", Integer),
    Column("run_id", Integer),
    Column("error", Text),
    Column("resolved_by", String(128)),
    Column("resolved_at", TZ),
)

TABLE_NAMES = frozenset(BOOKKEEPING.tables) | {"alembic_version"}


@dataclass(frozen=True)
class Caller:
    """Who is acting, from where: recorded on every run and on the lock."""

    actor: str
    host: str
    pid: int

    @classmethod
    def here(cls) -> Caller:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = f"uid:{os.getuid()}"
        return cls(actor=actor, host=socket.gethostname(), pid=os.getpid())


def start_run(
    conn: Connection,
    caller: Caller,
    command: str,
    from_revision: str | None,
    to_revision: str | None,
    plan: list[str],
) -> int:
    """Insert a ``running`` run and return its id (the caller commits)."""
    result = conn.execute(
        insert(runs_table).values(
            command=command,
            actor=caller.actor,
            host=caller.host,
            pid=caller.pid,
            started_at=utcnow(),
            from_revision=from_revision,
            to_revision=to_revision,
            result="running",
            plan=json.dumps(plan),
            steps="[]",
        )
    )
    return int(result.inserted_primary_key[0])


def add_step(conn: Connection, run_id: int, step: dict[str, Any]) -> None:
    steps = json.loads(
        conn.execute(
            select(runs_table.c.steps).where(runs_table.c.id == run_id)
        ).scalar_one()
    )
    steps.append(step)
    conn.execute(
        update(runs_table)
        .where(runs_table.c.id == run_id)
        .values(steps=json.dumps(steps))
    )


def finish_run(
    conn: Connection, run_id: int, result: str, error: str | None = None
) -> None:
    started = conn.execute(
        select(runs_table.c.started_at).where(runs_table.c.id == run_id)
    ).scalar_one()
    now = utcnow()
    conn.execute(
        update(runs_table)
        .where(runs_table.c.id == run_id)
        .values(
            finished_at=now,
            duration_ms=_ms_between(started, now),
            result=result,
            error=error,
        )
    )


def _ms_between(start: datetime, end: datetime) -> int:
    if start.tzinfo is None:  # SQLite returns naive datetimes
        end = end.replace(tzinfo=None)
    return int((end - start).total_seconds() * 1000)


def runs(conn: Connection, last: int) -> list[dict[str, Any]]:
    """The ``last`` runs, newest first, steps and plan decoded."""
    rows = conn.execute(
        select(runs_table).order_by(runs_table.c.id.desc()).limit(last)
    ).mappings()
    return [
        {**row, "plan": json.loads(row["plan"]), "steps": json.loads(row["steps"])}
        for row in rows
    ]


def close_interrupted_runs(conn: Connection) -> None:
    """Under the lock, any run still ``running`` died: mark it and its revision."""
    stale = [
        dict(r)
        for r in conn.execute(
            select(runs_table).where(runs_table.c.result == "running")
        ).mappings()
    ]
    for run in stale:
        info = interrupted(run)
        error = f"interrupted: process {run['pid']} on {run['host']} died"
        revision = info["in_progress"]
        if revision is not None and run["command"] == "migrate":
            conn.execute(
                delete(revisions_table).where(revisions_table.c.revision == revision)
            )
            conn.execute(
                insert(revisions_table).values(
                    revision=revision,
                    status="failed",
                    checksum=checksum(revision),
                    run_id=run["id"],
                    error=error,
                )
            )
        conn.execute(
            update(runs_table)
            .where(runs_table.c.id == run["id"])
            .values(result="interrupted", error=error)
        )
        logger.warning("migration_run_interrupted", run=run["id"], revision=revision)
    conn.commit()


def interrupted(run: dict[str, Any]) -> dict[str, Any]:
    """A run row that never finished, with what it completed and was doing."""
    plan = json.loads(run["plan"])
    steps = json.loads(run["steps"])
    in_progress = plan[len(steps)] if len(steps) < len(plan) else None
    return {
        "run_id": run["id"],
        "command": run["command"],
        "actor": run["actor"],
        "host": run["host"],
        "pid": run["pid"],
        "started_at": run["started_at"],
        "completed": [s["revision"] for s in steps],
        "in_progress": in_progress,
    }
