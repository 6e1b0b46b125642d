"""Running the schema's revisions: upgrade, rollback, resolve, unlock, status, log.

Alembic applies the revisions (``store/migrations``); this module wraps each run in
what operators need around it: the migration lock, a run log with each revision
file's checksum, a refusal to run over a revision whose file changed since it was
applied, a backup of an SQLite file before its schema changes, an audit entry, and a
plan (``--dry-run``) or an estimate (``--estimate``, both in :mod:`requiem.store.plan`).

Revision ids are ``001``, ``002`` … in one straight line, so "rollback to 002" means
what it says. Each revision runs in its own transaction (on SQLite too, see
``db.migration_engine``): a failure or a ``kill -9`` keeps every earlier revision and
rolls back the one in progress.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, delete, insert, inspect, select, update
from sqlalchemy.exc import SQLAlchemyError

from requiem import log
from requiem.control import audit
from requiem.settings import Settings
from requiem.store import db, history, lock, plan
from requiem.store.errors import (
    ChecksumMismatch,
    LockHolderAlive,
    MigrationFailed,
    RevisionNotFailed,
    RollbackOutOfRange,
)
from requiem.store.history import Caller, revisions_table, runs_table
from requiem.store.models import utcnow
from requiem.store.revisions import (
    alembic_config,
    chain,
    checksum,
    current_revision,
    describe,
    head,
    known,
    position,
)

DEFAULT_LOCK_WAIT_S = 120.0
# Test hook: sleep inside this revision's transaction, so a test can kill -9 the
# process half-way through a run.
PAUSE_ENV = "REQUIEM_TEST_MIGRATION_PAUSE"

logger = log.get("requiem.store.migrate")


@dataclass
class RunReport:
    """What one run did, as ``db migrate`` / ``db rollback`` print it."""

    command: str
    from_revision: str | None
    to_revision: str | None
    plan: list[str]
    run_id: int | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    backup: str | None = None
    duration_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "from": self.from_revision,
            "to": self.to_revision,
            "plan": self.plan,
            "run_id": self.run_id,
            "steps": self.steps,
            "backup": self.backup,
            "duration_ms": self.duration_ms,
        }


class Migrator:
    """Runs and inspects migrations of ``engine``'s database.

    ``timeout_s`` bounds the wait for the lock and, on PostgreSQL, every lock wait
    and statement (SQLite: its busy timeout). ``source`` is recorded in the audit
    entry (``cli``, ``service``).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        timeout_s: float | None = None,
        source: str = "cli",
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.timeout_s = timeout_s
        self.source = source
        self.caller = Caller.here()

    # -- running -------------------------------------------------------------

    @contextmanager
    def _locked(self, command_name: str) -> Iterator[Connection]:
        runner = db.migration_engine(self.engine, self.timeout_s)
        try:
            with db.connected(runner) as conn:
                migration_lock = lock.MigrationLock(conn, self.caller, command_name)
                migration_lock.acquire(self.timeout_s or DEFAULT_LOCK_WAIT_S)
                try:
                    history.close_interrupted_runs(conn)
                    yield conn
                finally:
                    migration_lock.release()
        finally:
            runner.dispose()

    def upgrade(self, target: str = "head") -> RunReport:
        """Apply every revision up to ``target``; stops at the first failure."""
        target = head() if target == "head" else known(target)
        with self._locked("migrate") as conn:
            current = current_revision(conn)
            if position(target) < position(current):
                msg = f"{target} is below the current revision {current}: use rollback"
                raise RollbackOutOfRange(msg)
            plan = list(chain()[position(current) + 1 : position(target) + 1])
            report = RunReport("migrate", current, target, plan)
            _refuse_modified(conn)
            if not plan:
                return report
            return self._run(conn, report, "upgrade")

    def rollback(self, steps: int | None = None, to: str | None = None) -> RunReport:
        """Undo the last ``steps`` revisions, or those above revision ``to``."""
        if to is not None:
            known(to)
        with self._locked("rollback") as conn:
            current = current_revision(conn)
            applied = position(current) + 1
            if to is not None:
                if position(to) > position(current):
                    msg = f"cannot roll back to {to}: the database is at {current}"
                    raise RollbackOutOfRange(msg, current=current)
                target_index = position(to)
            else:
                count = 1 if steps is None else steps
                if count < 1 or count > applied:
                    msg = (
                        f"cannot roll back {count} step(s): {applied} revision(s)"
                        f" applied (database at {current or 'no revision'})"
                    )
                    raise RollbackOutOfRange(msg, current=current, applied=applied)
                target_index = applied - 1 - count
            target = chain()[target_index] if target_index >= 0 else None
            plan = list(reversed(chain()[target_index + 1 : applied]))
            report = RunReport("rollback", current, target, plan)
            _refuse_modified(conn)
            if not plan:
                return report
            return self._run(conn, report, "downgrade")

    def _run(self, conn: Connection, report: RunReport, direction: str) -> RunReport:
        started = time.monotonic()
        report.backup = self._backup(report.from_revision)
        report.run_id = history.start_run(
            conn,
            self.caller,
            report.command,
            report.from_revision,
            report.to_revision,
            report.plan,
        )
        conn.commit()
        logger.info("migration_started", run=report.run_id, plan=report.plan)

        clock = [time.monotonic()]
        config = alembic_config(
            connection=conn,
            on_version_apply=_step_recorder(report, clock),
        )
        try:
            if direction == "upgrade":
                command.upgrade(config, report.to_revision or "head")
            else:
                command.downgrade(config, report.to_revision or "base")
            if conn.in_transaction():
                conn.commit()
        except Exception as exc:  # noqa: BLE001 - any failure of a revision
            self._fail(conn, report, exc, started)
        report.duration_ms = int((time.monotonic() - started) * 1000)
        history.finish_run(conn, report.run_id, "succeeded")
        conn.commit()
        logger.info(
            "migration_finished", run=report.run_id, duration_ms=report.duration_ms
        )
        self._audit(f"db.{report.command}", report, "success")
        return report

    def _fail(
        self, conn: Connection, report: RunReport, exc: Exception, started: float
    ) -> None:
        failed = report.plan[len(report.steps)]
        reason = _reason(exc)
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(delete(revisions_table).where(_is(failed)))
            conn.execute(
                insert(revisions_table).values(
                    revision=failed,
                    status="failed",
                    checksum=checksum(failed),
                    run_id=report.run_id,
                    error=reason,
                )
            )
            history.finish_run(conn, report.run_id, "failed", f"{failed}: {reason}")
            conn.commit()
        except SQLAlchemyError as record_exc:  # the connection itself may be gone
            logger.error("migration_failure_not_recorded", error=_reason(record_exc))
        report.duration_ms = int((time.monotonic() - started) * 1000)
        self._audit(f"db.{report.command}", report, "failure", failed=failed)
        done = report.steps[-1]["revision"] if report.steps else None
        at = _after(report, done)
        msg = (
            f"revision {failed} failed: {reason}; run #{report.run_id} stopped"
            f" with the database at {at or 'no revision'}"
        )
        raise MigrationFailed(msg, revision=failed, run_id=report.run_id) from exc

    # -- repairs -------------------------------------------------------------

    def resolve(self, revision: str, applied: bool = False) -> dict[str, Any]:
        """Settle a failed or modified revision; RevisionNotFailed otherwise.

        A failed revision is cleared (it is pending again and the next migrate
        retries it), or with ``applied`` stamped as applied because a manual fix
        made its changes. A revision whose file changed since it was applied gets
        the file's new checksum accepted.
        """
        known(revision)
        with self._locked("resolve") as conn:
            row = _revision_row(conn, revision)
            now_sum = checksum(revision)
            if row is not None and row["status"] == "failed":
                action = "marked applied" if applied else "cleared failure"
                self._settle_failed(conn, revision, applied, now_sum)
            elif row is not None and row["checksum"] != now_sum:
                action = "accepted new checksum"
                conn.execute(
                    update(revisions_table)
                    .where(_is(revision))
                    .values(
                        checksum=now_sum,
                        resolved_by=self.caller.actor,
                        resolved_at=utcnow(),
                    )
                )
            else:
                state = row["status"] if row else "not recorded"
                msg = (
                    f"revision {revision} is neither failed nor modified"
                    f" ({state}); nothing to resolve"
                )
                raise RevisionNotFailed(msg, revision=revision)
            run_id = history.start_run(
                conn, self.caller, "resolve", revision, revision, [revision]
            )
            history.add_step(
                conn,
                run_id,
                {"revision": revision, "action": action, "checksum": now_sum},
            )
            history.finish_run(conn, run_id, "succeeded")
            conn.commit()
        outcome = {"revision": revision, "action": action, "run_id": run_id}
        self._audit_action("db.resolve", revision, "success", outcome)
        return outcome

    def _settle_failed(
        self, conn: Connection, revision: str, applied: bool, now_sum: str
    ) -> None:
        current = current_revision(conn)
        if not applied:
            conn.execute(delete(revisions_table).where(_is(revision)))
            return
        if position(revision) != position(current) + 1:
            msg = (
                f"revision {revision} cannot be marked applied: the database is at"
                f" {current or 'no revision'}, so the next revision is"
                f" {chain()[position(current) + 1]}"
            )
            raise RollbackOutOfRange(msg, revision=revision)
        conn.commit()
        command.stamp(alembic_config(connection=conn), revision)
        conn.execute(
            update(revisions_table)
            .where(_is(revision))
            .values(
                status="applied",
                checksum=now_sum,
                applied_at=utcnow(),
                error=None,
                resolved_by=self.caller.actor,
                resolved_at=utcnow(),
            )
        )

    def force_unlock(self, holder_alive_ok: bool = False) -> dict[str, Any]:
        """Release the migration lock whoever holds it (``db unlock --force``)."""
        with db.connected(self.engine) as conn:
            state = lock.read(conn)
            if state.holder is None and state.backend_pid is None:
                return {"released": False, "lock": None}
            if state.holder_alive and not holder_alive_ok:
                msg = (
                    f"migration lock {state.describe()}, and that process is alive"
                    " on this host; stop it first, or pass --i-know-it-is-alive"
                )
                raise LockHolderAlive(msg, pid=state.holder["pid"])
            lock.force_release(conn)
            if inspect(conn).has_table(runs_table.name):
                run_id = history.start_run(conn, self.caller, "unlock", None, None, [])
                history.add_step(conn, run_id, {"released": lock.plain(state.holder)})
                history.finish_run(conn, run_id, "succeeded")
                conn.commit()
        details = {"holder": lock.plain(state.holder), "stale": state.stale}
        self._audit_action("db.unlock", "migration_lock", "success", details)
        return {"released": True, "lock": details, "was": state.describe()}

    # -- looking -------------------------------------------------------------

    def dry_run(self, target: str = "head") -> tuple[list[str], str]:
        """The plan to ``target`` and its SQL (see :mod:`requiem.store.plan`)."""
        return plan.dry_run(self.engine, target)

    def estimate(
        self, target: str = "head", large_rows: int = plan.LARGE_TABLE_ROWS
    ) -> list[dict[str, Any]]:
        """Per pending revision: tables, rows, a duration guess."""
        return plan.estimate(self.engine, target, large_rows)

    def status(self) -> dict[str, Any]:
        """Current and pending revisions, failed, modified, interrupted, the lock."""
        with db.connected(self.engine) as conn:
            current = current_revision(conn)
            booked = inspect(conn).has_table(revisions_table.name)
            recorded = (
                {
                    r["revision"]: dict(r)
                    for r in conn.execute(select(revisions_table)).mappings()
                }
                if booked
                else {}
            )
            state = lock.read(conn)
            running = (
                [
                    dict(r)
                    for r in conn.execute(
                        select(runs_table).where(runs_table.c.result == "running")
                    ).mappings()
                ]
                if booked
                else []
            )
        revisions = []
        for index, revision in enumerate(chain()):
            row = recorded.get(revision)
            now_sum = checksum(revision)
            is_applied = index <= position(current)
            failed = row is not None and row["status"] == "failed"
            revisions.append(
                {
                    "revision": revision,
                    "description": describe(revision),
                    "state": "failed"
                    if failed
                    else ("applied" if is_applied else "pending"),
                    "applied_at": row["applied_at"] if row and is_applied else None,
                    "duration_ms": row["duration_ms"] if row and is_applied else None,
                    "modified": bool(is_applied and row and row["checksum"] != now_sum),
                    "checksum": now_sum,
                    "recorded_checksum": row["checksum"] if row else None,
                    "error": row["error"] if failed else None,
                    "resolved_by": row["resolved_by"] if row else None,
                }
            )
        interrupted = [
            history.interrupted(run)
            for run in running
            if not _is_lock_holder(state, run)
        ]
        return {
            "database": db.masked(
                self.engine.url.render_as_string(hide_password=False)
            ),
            "current": current,
            "head": head(),
            "pending": [r["revision"] for r in revisions if r["state"] == "pending"],
            "failed": [r["revision"] for r in revisions if r["state"] == "failed"],
            "modified": [r["revision"] for r in revisions if r["modified"]],
            "interrupted": interrupted,
            "lock": {
                "held": state.held,
                "stale": state.stale,
                "description": state.describe(),
            },
            "revisions": revisions,
        }

    def log(self, last: int) -> list[dict[str, Any]]:
        with db.connected(self.engine) as conn:
            if not inspect(conn).has_table(runs_table.name):
                return []
            return history.runs(conn, last)

    # -- around a run --------------------------------------------------------

    def _backup(self, current: str | None) -> str | None:
        """Copy the SQLite file into $REQUIEM_HOME/backups before changing it."""
        url = self.engine.url
        if url.get_backend_name() != "sqlite" or current is None:
            return None
        source = Path(url.database or "")
        if not source.is_file():
            return None
        folder = self.settings.home / "backups"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        target = folder / f"{source.stem}-{stamp}-at-{current}.db"
        with closing(sqlite3.connect(source)) as src:
            with closing(sqlite3.connect(target)) as dst:
                src.backup(dst)
        logger.info("sqlite_backup_written", path=str(target))
        return str(target)

    def _audit(
        self, action: str, report: RunReport, outcome: str, **extra: Any
    ) -> None:
        details = {
            "run_id": report.run_id,
            "from": report.from_revision,
            "to": report.to_revision,
            "plan": report.plan,
            "duration_ms": report.duration_ms,
            "backup": report.backup,
            "host": self.caller.host,
            "pid": self.caller.pid,
            **extra,
        }
        target = f"{report.from_revision or 'base'}->{report.to_revision or 'base'}"
        self._audit_action(action, target, outcome, details)

    def _audit_action(
        self, action: str, target: str, outcome: str, details: dict[str, Any]
    ) -> None:
        """Record in the audit log; skipped, with a warning, before it exists."""
        try:
            with db.connected(self.engine) as conn:
                ready = inspect(conn).has_table("audit_pending")
            if not ready:
                logger.warning("audit_log_absent", action=action)
                return
            audit.record(
                db.session_factory(self.engine),
                action,
                actor=self.caller.actor,
                target=target,
                outcome=outcome,
                source=self.source,
                details=details,
            )
        except SQLAlchemyError as exc:
            logger.error("audit_record_failed", action=action, error=_reason(exc))


def _step_recorder(report: RunReport, clock: list[float]):  # noqa: ANN202
    """Alembic's on_version_apply callback: record the step in its transaction."""

    def record(ctx: MigrationContext, step: Any, heads: Any, run_args: Any) -> None:
        conn = ctx.connection
        assert conn is not None
        revision = step.up_revision_id
        now = time.monotonic()
        took = int((now - clock[0]) * 1000)
        clock[0] = now
        entry = {
            "revision": revision,
            "direction": "up" if step.is_upgrade else "down",
            "checksum": checksum(revision),
            "duration_ms": took,
        }
        conn.execute(delete(revisions_table).where(_is(revision)))
        if step.is_upgrade:
            conn.execute(
                insert(revisions_table).values(
                    revision=revision,
                    status="applied",
                    checksum=entry["checksum"],
                    applied_at=utcnow(),
                    duration_ms=took,
                    run_id=report.run_id,
                )
            )
        history.add_step(conn, report.run_id, entry)
        report.steps.append(entry)
        _pause_if_asked(revision)

    return record


def _pause_if_asked(revision: str) -> None:
    if os.environ.get(PAUSE_ENV) == revision:
        sys.stderr.write(f"requiem: paused inside revision {revision}\n")
        sys.stderr.flush()
        time.sleep(3600)


def _after(report: RunReport, done: str | None) -> str | None:
    """Where the database is after the completed steps of ``report``."""
    if done is None:
        return report.from_revision
    if report.command == "migrate":
        return done
    index = position(done) - 1
    return chain()[index] if index >= 0 else None


def _is_lock_holder(state: lock.LockState, run: dict[str, Any]) -> bool:
    holder = state.holder
    return (
        state.held
        and holder is not None
        and holder["pid"] == run["pid"]
        and holder["host"] == run["host"]
    )


def _refuse_modified(conn: Connection) -> None:
    applied = conn.execute(
        select(revisions_table.c.revision, revisions_table.c.checksum).where(
            revisions_table.c.status == "applied"
        )
    ).all()
    changed = [rev for rev, recorded in applied if checksum(rev) != recorded]
    if changed:
        msg = (
            f"revision file(s) {', '.join(sorted(changed))} changed since applied;"
            " review, then `requiem db resolve --version ID` to accept"
        )
        raise ChecksumMismatch(msg, revisions=sorted(changed))


def _revision_row(conn: Connection, revision: str) -> dict[str, Any] | None:
    row = conn.execute(select(revisions_table).where(_is(revision))).mappings().first()
    return dict(row) if row else None


def _is(revision: str):  # noqa: ANN202
    return revisions_table.c.revision == revision


def _reason(exc: BaseException) -> str:
    source = getattr(exc, "orig", None) or exc
    first = str(source).strip().splitlines()
    return first[0] if first else type(source).__name__
