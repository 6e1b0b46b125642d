"""``requiem db``: the control-plane database — reach it, migrate it, repair it.

Every command but ``db pool …`` works on the database directly (``DATABASE_URL``, or
SQLite at ``$REQUIEM_HOME/requiem.db``); ``db pool …`` asks the running server about
its connection pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from requiem import settings
from requiem.cli import output
from requiem.cli.client import ApiClient
from requiem.errors import UsageError
from requiem.store import db, lock, profile
from requiem.store.errors import SchemaNotCurrent

if TYPE_CHECKING:
    from requiem.store import migrate

db_app = typer.Typer(
    name="db",
    help="The control-plane database: ping, status, migrate, rollback, locks, pool.",
    no_args_is_help=True,
)
pool_app = typer.Typer(
    name="pool",
    help="The running server's connection pool: status, drain, leaks, reset.",
    no_args_is_help=True,
)
db_app.add_typer(pool_app)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0.1,
        help="Seconds to wait for the lock; also bounds each lock wait and statement.",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(db_app)


def _migrator(timeout_s: float | None = None) -> migrate.Migrator:
    """The runner for the configured database (Alembic is imported only now)."""
    from requiem.store.migrate import Migrator

    config = settings.load()
    return Migrator(db.make_engine(config), config, timeout_s=timeout_s)


def _steps_text(steps: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['revision']} {s['duration_ms']} ms" for s in steps) or "-"


@db_app.command("ping")
def ping(as_json: JsonFlag = False) -> None:
    """Connect and time one round trip; exit 6 with the reason when unreachable."""
    config = settings.load()
    engine = db.make_engine(config)
    timings = db.ping(engine)
    where = db.masked(config.database_url)
    if as_json:
        output.print_json({"ok": True, "database": where, **timings})
        return
    output.line(
        f"ok {where}: round trip {timings['round_trip_ms']:.2f} ms"
        f" (connect {timings['connect_ms']:.2f} ms)"
    )


@db_app.command("status")
def status(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Every revision, with timings.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Current revision, pending, failed, modified and interrupted ones, the lock.

    Exits 8 (schema_not_current) unless the database is at the newest revision with
    nothing failed, modified or interrupted.
    """
    report = _migrator().status()
    problems = _problems(report)
    if as_json:
        output.print_json({"ok": not problems, "problems": problems, **report})
    else:
        _print_status(report, verbose)
    if problems:
        error = SchemaNotCurrent("; ".join(problems))
        if as_json:
            raise typer.Exit(error.exit_code)
        raise error


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    if report["pending"]:
        problems.append(f"{len(report['pending'])} revision(s) pending")
    for key in ("failed", "modified"):
        if report[key]:
            problems.append(f"{key}: {', '.join(report[key])}")
    for run in report["interrupted"]:
        problems.append(f"run #{run['run_id']} was interrupted")
    return problems


def _print_status(report: dict[str, Any], verbose: bool) -> None:
    current = report["current"] or "none (empty database)"
    if report["current"] == report["head"]:
        current += " (head)"
    output.key_values(
        {
            "database": report["database"],
            "current": current,
            "head": report["head"],
            "pending": ", ".join(report["pending"]) or "none",
            "failed": ", ".join(report["failed"]) or "none",
            "modified": ", ".join(report["modified"]) or "none",
            "lock": report["lock"]["description"],
        }
    )
    for run in report["interrupted"]:
        doing = run["in_progress"] or "nothing"
        output.note(
            f"run #{run['run_id']} ({run['command']} by {run['actor']} on"
            f" {run['host']} pid {run['pid']}, started {run['started_at']}) did not"
            f" finish: the process is gone while applying {doing}. Revisions run in"
            " their own transactions, so that one was rolled back; rerun"
            " `requiem db migrate`, or after a manual fix"
            f" `requiem db resolve --version {doing} --applied`."
        )
    for revision in report["revisions"]:
        if revision["modified"]:
            output.note(
                f"revision {revision['revision']}'s file changed since it was applied;"
                " migrate refuses until `requiem db resolve --version"
                f" {revision['revision']}` accepts it"
            )
        if revision["state"] == "failed":
            output.note(f"revision {revision['revision']} failed: {revision['error']}")
    if verbose:
        for r in report["revisions"]:
            took = f"{r['duration_ms']} ms" if r["duration_ms"] is not None else "-"
            state = r["state"] + (" (modified)" if r["modified"] else "")
            output.line(
                f"{r['revision']}  {state:<18} {_when(r['applied_at']):<20}"
                f" {took:>8}  {r['checksum'][:12]}  {r['description']}"
            )


def _when(moment: Any) -> str:
    """A stored time as ``YYYY-MM-DD HH:MM:SSZ`` (SQLite keeps UTC without zone)."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        return moment
    return moment.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds") + "Z"


@db_app.command("log")
def log_(
    last: Annotated[int, typer.Option("--last", min=1, help="How many runs.")] = 10,
    as_json: JsonFlag = False,
) -> None:
    """The last N migration runs, newest first."""
    runs = _migrator().log(last)
    if as_json:
        output.print_json({"runs": runs})
        return
    if not runs:
        output.note("no migration runs recorded")
        return
    for run in runs:
        result = run["result"] + (f" ({run['error']})" if run["error"] else "")
        took = f"{run['duration_ms']} ms" if run["duration_ms"] is not None else "-"
        steps = [s for s in run["steps"] if "duration_ms" in s]
        output.line(
            f"#{run['id']:<4} {run['command']:<9}"
            f" {run['from_revision'] or '-'} → {run['to_revision'] or '-'}"
            f"  {_when(run['started_at'])}  {took:>8}"
            f"  {run['actor']}@{run['host']} pid {run['pid']}  {result}"
            + (f"  [{_steps_text(steps)}]" if steps else "")
        )


@db_app.command("migrate")
def migrate_(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and its SQL only.")
    ] = False,
    estimate: Annotated[
        bool,
        typer.Option("--estimate", help="Tables, row counts and duration per step."),
    ] = False,
    to: Annotated[
        str, typer.Option("--to", help="Stop at this revision (default: newest).")
    ] = "head",
    timeout: Timeout = None,
    as_json: JsonFlag = False,
) -> None:
    """Apply pending revisions under the migration lock (REQUIEM_ENV picks rules)."""
    profile.check(settings.load())
    migrator = _migrator(timeout)
    if dry_run:
        plan, sql = migrator.dry_run(to)
        if as_json:
            output.print_json({"plan": plan, "sql": sql})
        elif not plan:
            output.note("nothing to apply: the database is at the target revision")
        else:
            output.note(f"plan: {' → '.join(plan)} (nothing was changed)")
            output.line(sql.rstrip())
        return
    if estimate:
        _print_estimate(migrator.estimate(to), as_json)
        return
    report = migrator.upgrade(to)
    if report.backup:
        output.note(f"backup of the database before migrating: {report.backup}")
    if as_json:
        output.print_json({"ok": True, **report.as_dict()})
    elif not report.plan:
        output.line(f"up to date at {report.from_revision}")
    else:
        output.line(
            f"migrated {report.from_revision or 'empty'} → {report.to_revision}"
            f" in {report.duration_ms} ms ({_steps_text(report.steps)});"
            f" run #{report.run_id}"
        )


def _print_estimate(rows: list[dict[str, Any]], as_json: bool) -> None:
    from requiem.store.plan import LARGE_TABLE_ROWS

    if as_json:
        output.print_json({"revisions": rows, "large_table_rows": LARGE_TABLE_ROWS})
    elif not rows:
        output.note("nothing to apply: the database is at the target revision")
    else:
        output.table(
            None,
            ["revision", "creates", "touches (rows)", "statements", "estimate"],
            [
                [
                    r["revision"],
                    ", ".join(r["creates"]) or "-",
                    ", ".join(f"{t} ({n:,})" for t, n in r["touches"].items()) or "-",
                    r["statements"],
                    f"~{r['estimated_s']:g} s",
                ]
                for r in rows
            ],
        )
    for row in rows:
        for table in row["large_tables"]:
            output.note(
                f"warning: revision {row['revision']} alters {table}"
                f" ({row['touches'][table]:,} rows): it locks that table while it"
                " runs; plan a maintenance window"
            )


@db_app.command("rollback")
def rollback(
    steps: Annotated[
        int | None, typer.Option("--steps", help="Undo this many revisions.")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Undo every revision above this one.")
    ] = None,
    timeout: Timeout = None,
    as_json: JsonFlag = False,
) -> None:
    """Undo the newest revisions under the lock; SQLite is backed up first."""
    if steps is not None and to is not None:
        msg = "give --steps or --to, not both"
        raise UsageError(msg)
    report = _migrator(timeout).rollback(steps=steps, to=to)
    if report.backup:
        output.note(f"backup of the database before rolling back: {report.backup}")
    if as_json:
        output.print_json({"ok": True, **report.as_dict()})
    else:
        output.line(
            f"rolled back {report.from_revision} → {report.to_revision or 'empty'}"
            f" in {report.duration_ms} ms ({_steps_text(report.steps)});"
            f" run #{report.run_id}"
        )


@db_app.command("resolve")
def resolve(
    version: Annotated[str, typer.Option("--version", help="Revision id, e.g. 002.")],
    applied: Annotated[
        bool,
        typer.Option(
            "--applied", help="A manual fix made the revision's changes: stamp it."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Settle a failed, interrupted or modified revision after a manual check."""
    outcome = _migrator().resolve(version, applied=applied)
    if as_json:
        output.print_json({"ok": True, **outcome})
    else:
        output.line(
            f"revision {version}: {outcome['action']} (run #{outcome['run_id']})"
        )


@db_app.command("locks")
def locks(as_json: JsonFlag = False) -> None:
    """The migration lock's holder; on PostgreSQL also sessions blocked by others."""
    migrator = _migrator()
    with db.connected(migrator.engine) as conn:
        state = lock.read(conn)
        postgres = lock.is_postgres(conn)
        blocked = lock.blocking_sessions(conn) if postgres else []
    holder = lock.plain(state.holder)
    if as_json:
        output.print_json(
            {
                "migration_lock": {
                    "held": state.held,
                    "stale": state.stale,
                    "holder": holder,
                    "holder_alive": state.holder_alive,
                    "age_s": state.age_s,
                    "backend_pid": state.backend_pid,
                },
                "blocked_sessions": blocked,
            }
        )
        return
    output.line(f"migration lock: {state.describe()}")
    if holder is not None:
        alive = {True: "yes", False: "no", None: "unknown (another host)"}
        output.key_values(
            {
                "holder": holder["actor"],
                "host": holder["host"],
                "pid": holder["pid"],
                "command": holder["command"],
                "age": f"{state.age_s:.0f} s",
                "alive": alive[state.holder_alive],
                "backend pid": state.backend_pid or "-",
            }
        )
    if blocked:
        output.table(
            "blocked sessions",
            ["pid", "blocked by", "user", "application", "state", "waiting", "query"],
            [
                [
                    b["pid"],
                    ", ".join(str(p) for p in b["blocked_by"]),
                    b["user"],
                    b["application"],
                    b["state"],
                    f"{float(b['waiting_s'] or 0):.0f} s",
                    b["query"],
                ]
                for b in blocked
            ],
        )
    elif postgres:
        output.line("no session is waiting on another's lock")


@db_app.command("unlock")
def unlock(
    force: Annotated[
        bool, typer.Option("--force", help="Required: release the migration lock.")
    ] = False,
    alive_ok: Annotated[
        bool,
        typer.Option(
            "--i-know-it-is-alive",
            help="Release even though the holder still runs on this host.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Release a stale migration lock (recorded in the run log and the audit log)."""
    if not force:
        msg = "db unlock releases the migration lock only with --force"
        raise UsageError(msg)
    outcome = _migrator().force_unlock(holder_alive_ok=alive_ok)
    if as_json:
        output.print_json({"ok": True, **outcome})
    elif not outcome["released"]:
        output.line("no migration lock was held; nothing released")
    else:
        output.line(f"released the migration lock ({outcome['was']})")


@pool_app.command("status")
def pool_status(as_json: JsonFlag = False) -> None:
    """Size, checked out, overflow, waiters and checkouts of the server's pool."""
    _show(ApiClient.from_settings(settings.load()).get("/api/admin/db/pool"), as_json)


@pool_app.command("drain")
def pool_drain(
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds to wait for returns.")
    ] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Stop new checkouts and wait for connections to come back."""
    client = ApiClient.from_settings(settings.load(), timeout=timeout + 10)
    result = client.post("/api/admin/db/pool/drain", params={"timeout_s": timeout})
    _show(result, as_json)
    if isinstance(result, dict) and result.get("drained") is False:
        raise typer.Exit(8)


@pool_app.command("leaks")
def pool_leaks(
    threshold_s: Annotated[
        float, typer.Option("--threshold-s", min=0, help="Held longer than this.")
    ] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Connections held longer than the threshold, with request id and stack."""
    client = ApiClient.from_settings(settings.load())
    leaks = client.get("/api/admin/db/pool/leaks", params={"threshold_s": threshold_s})
    if as_json:
        output.print_json(leaks)
        return
    items = leaks.get("leaks", leaks) if isinstance(leaks, dict) else leaks
    if not items:
        output.line(f"no connection held longer than {threshold_s:g} s")
        return
    for leak in items:
        output.line(
            f"held {leak['held_s']} s since {leak['since']} by request"
            f" {leak['request_id'] or '-'} (thread {leak['thread']})"
        )
        for frame in leak["stack"]:
            output.line(f"    {frame}")


@pool_app.command("reset")
def pool_reset(as_json: JsonFlag = False) -> None:
    """Close every pooled connection and start a fresh pool."""
    client = ApiClient.from_settings(settings.load())
    _show(client.post("/api/admin/db/pool/reset"), as_json)


def _show(result: Any, as_json: bool) -> None:
    if as_json or not isinstance(result, dict):
        output.print_json(result)
    else:
        output.key_values({k: v for k, v in result.items() if k != "holders"})
