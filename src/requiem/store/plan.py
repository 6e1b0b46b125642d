"""What a migration would do, without doing it: ``--dry-run`` and ``--estimate``.

The SQL comes from Alembic's offline mode, so it is the SQL the revisions would run
on this database's dialect. The estimate reads that SQL for the tables each revision
creates or touches, counts the rows of the touched ones, and prices the revision with
a deliberately simple model (below): it is a warning device for big tables, not a
promise.
"""

from __future__ import annotations

import io
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import Connection, Engine, inspect, text

from requiem.store import db, history
from requiem.store.revisions import (
    alembic_config,
    chain,
    current_revision,
    describe,
    head,
    known,
    position,
)

# --estimate: a revision that rewrites or indexes a table this large is flagged,
# since it holds that table's lock for the whole statement.
LARGE_TABLE_ROWS = 1_000_000
# --estimate's cost model: a fixed cost per statement plus a scan of every row of
# each existing table the revision alters, indexes or writes.
SECONDS_PER_STATEMENT = 0.05
ROWS_PER_SECOND = 250_000
_TOUCHES = re.compile(
    r"^\s*(?:ALTER TABLE|DROP TABLE|UPDATE|INSERT INTO|DELETE FROM"
    r"|CREATE (?:UNIQUE )?INDEX \S+ ON|DROP INDEX \S+ ON)\s+\"?(\w+)",
    re.IGNORECASE | re.MULTILINE,
)
_CREATES = re.compile(r"^\s*CREATE TABLE\s+\"?(\w+)", re.IGNORECASE | re.MULTILINE)
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)


def dry_run(engine: Engine, target: str = "head") -> tuple[list[str], str]:
    """The revisions from the current one to ``target`` and their SQL."""
    target = head() if target == "head" else known(target)
    current = None
    if not _absent_sqlite_file(engine):  # do not create the file to read nothing
        with db.connected(engine) as conn:
            current = current_revision(conn)
    plan = list(chain()[position(current) + 1 : position(target) + 1])
    if not plan:
        return plan, ""
    return plan, _offline_sql(engine, current, target)


def estimate(
    engine: Engine, target: str = "head", large_rows: int = LARGE_TABLE_ROWS
) -> list[dict[str, Any]]:
    """Per pending revision: tables it creates and touches, rows, a duration guess."""
    plan, _ = dry_run(engine, target)
    rows: list[dict[str, Any]] = []
    if not plan:
        return rows
    absent = _absent_sqlite_file(engine)
    with nullcontext() if absent else db.connected(engine) as conn:
        existing = set() if conn is None else set(inspect(conn).get_table_names())
        previous = None if conn is None else current_revision(conn)
        for revision in plan:
            sql = _offline_sql(engine, previous, revision)
            previous = revision
            created = sorted(set(_CREATES.findall(sql)) - history.TABLE_NAMES)
            touched = sorted(
                set(_TOUCHES.findall(sql)) - set(created) - history.TABLE_NAMES
            )
            counts = {
                name: _row_count(conn, name) if name in existing else 0
                for name in touched
            }
            statements = len(_STATEMENT_END.findall(sql))
            seconds = (
                statements * SECONDS_PER_STATEMENT
                + sum(counts.values()) / ROWS_PER_SECOND
            )
            rows.append(
                {
                    "revision": revision,
                    "description": describe(revision),
                    "creates": created,
                    "touches": counts,
                    "statements": statements,
                    "estimated_s": round(seconds, 2),
                    "large_tables": sorted(
                        name for name, count in counts.items() if count >= large_rows
                    ),
                }
            )
    return rows


def _offline_sql(engine: Engine, start: str | None, end: str) -> str:
    output = io.StringIO()
    url = engine.url.render_as_string(hide_password=False)
    config = alembic_config(url=url, output=output)
    command.upgrade(config, f"{start}:{end}" if start else end, sql=True)
    return output.getvalue()


def _row_count(conn: Connection, table: str) -> int:
    quoted = conn.dialect.identifier_preparer.quote(table)
    return int(conn.execute(text(f"SELECT count(*) FROM {quoted}")).scalar_one())


def _absent_sqlite_file(engine: Engine) -> bool:
    url = engine.url
    return url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file()
