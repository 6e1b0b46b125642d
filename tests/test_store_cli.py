"""`requiem db …` as operators run it: real processes on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from requiem.cli.main import main

PAUSE = "REQUIEM_TEST_MIGRATION_PAUSE"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run(home, capsys, monkeypatch):
    """The real `requiem` entry point, in this process (no interpreter start-up).

    Tests that need a second process (a lock holder, a kill -9) start one; every
    other command runs here, through the same ``main`` the console script calls.
    """

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        capsys.readouterr()
        with monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


def _db(url: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": url, **extra}


def _start_paused(url: str, revision: str) -> subprocess.Popen:
    """A `db migrate` that stops inside ``revision``, returned once it is there."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "requiem", "db", "migrate"],
        env={**os.environ, **_db(url, **{PAUSE: revision})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=1):
            continue
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if f"paused inside revision {revision}" in line:
            return proc
    proc.kill()
    pytest.fail(f"migration never paused in {revision}: {''.join(seen)}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _json(result) -> dict:
    return json.loads(result.stdout)


def test_ping_reports_latency(run, database_url: str) -> None:
    """db ping: exit 0 and the round trip in milliseconds."""
    result = run("db", "ping", "--json", env=_db(database_url))

    assert result.code == 0, result.stderr
    assert _json(result)["ok"] is True
    assert _json(result)["round_trip_ms"] >= 0


def test_migrate_then_status_is_clean(run, database_url: str) -> None:
    """Before: schema_not_current (8). migrate: 0. After: status 0, nothing pending."""
    env = _db(database_url)

    before = run("db", "status", "--json", env=env)
    migrated = run("db", "migrate", "--json", env=env)
    after = run("db", "status", "--json", env=env)
    again = run("db", "migrate", env=env)

    assert before.code == 8
    assert _json(before)["pending"] == ["001", "002", "003", "004"]
    assert migrated.code == 0, migrated.stderr
    assert _json(migrated)["plan"] == ["001", "002", "003", "004"]
    assert after.code == 0
    assert _json(after)["current"] == "004"
    assert again.stdout.startswith("up to date at 004")


def test_dry_run_prints_sql_without_touching(run, database_url: str) -> None:
    """--dry-run: SQL on stdout, the plan on stderr, the database still empty."""
    env = _db(database_url)

    result = run("db", "migrate", "--dry-run", env=env)
    status = run("db", "status", "--json", env=env)

    assert result.code == 0
    assert "CREATE TABLE tenants" in result.stdout
    assert "plan: 001 → 002 → 003 → 004" in result.stderr
    assert _json(status)["current"] is None


def test_named_bad_inputs(run, database_url: str) -> None:
    """Unknown revision, rollback past the first, resolving what did not fail."""
    env = _db(database_url)
    assert run("db", "migrate", "--to", "002", env=env).code == 0

    unknown = run("db", "rollback", "--to", "999", env=env)
    too_far = run("db", "rollback", "--steps", "3", env=env)
    not_failed = run("db", "resolve", "--version", "002", env=env)
    no_force = run("db", "unlock", env=env)

    assert unknown.code == 2
    assert "error[unknown_revision]" in unknown.stderr
    assert too_far.code == 2
    assert "error[rollback_out_of_range]" in too_far.stderr
    assert not_failed.code == 8
    assert "error[revision_not_failed]" in not_failed.stderr
    assert no_force.code == 2
    assert "error[usage_error]" in no_force.stderr
    for result in (unknown, too_far, not_failed, no_force):
        assert "Traceback" not in result.stderr
        assert result.stderr.count("error[") == 1


def test_malformed_database_url(run) -> None:
    """A URL that cannot be parsed: config_error, exit 2, one line."""
    for url in ("not a url", "postgresql://u@127.0.0.1:port/db", "mysql://127.0.0.1/x"):
        result = run("db", "ping", env=_db(url))

        assert result.code == 2, url
        assert result.stderr.startswith("requiem: error[config_error]:"), url
        assert len(result.stderr.splitlines()) == 1


def test_unreachable_database(run) -> None:
    """Nothing listens on port 1: database_unreachable, exit 6."""
    result = run("db", "ping", env=_db("postgresql://postgres@127.0.0.1:1/test"))

    assert result.code == 6
    assert result.stderr.startswith("requiem: error[database_unreachable]:")


def test_login_refused(run, postgres_server_url: str) -> None:
    """A role the server does not know is refused: database_auth_failed, exit 6.

    The test server trusts every login, so a wrong password cannot fail here; an
    unknown role is refused the same way and maps to the same code. The password in
    the URL is masked in the message.
    """
    base = postgres_server_url.split("://", 1)[1].split("@", 1)[1]
    url = f"postgresql://requiem_no_such_role:hunter2pw@{base}"

    result = run("db", "ping", env=_db(url))

    assert result.code == 6
    assert result.stderr.startswith("requiem: error[database_auth_failed]:")
    assert "hunter2pw" not in result.stderr


def test_production_profile_refuses_sqlite_and_default_secret(
    run, postgres_url: str
) -> None:
    """REQUIEM_ENV=production: no SQLite unless allowed, no missing secret."""
    sqlite = run("db", "migrate", env={"REQUIEM_ENV": "production"})
    no_secret = run("db", "migrate", env=_db(postgres_url, REQUIEM_ENV="production"))
    allowed = run(
        "db",
        "migrate",
        "--dry-run",
        env={
            "REQUIEM_ENV": "production",
            "REQUIEM_ALLOW_SQLITE_IN_PRODUCTION": "true",
            "REQUIEM_SECRET_KEY": "a-real-secret-for-this-test",
        },
    )

    assert sqlite.code == 2
    assert "error[sqlite_in_production]" in sqlite.stderr
    assert no_secret.code == 2
    assert "error[default_secret_in_production]" in no_secret.stderr
    assert allowed.code == 0, allowed.stderr


def test_two_migrations_at_once_end_at_head(run, database_url: str) -> None:
    """Both processes succeed (one applies, one waits); the log holds one run."""
    env = {**os.environ, **_db(database_url)}
    command = [sys.executable, "-m", "requiem", "db", "migrate", "--timeout", "60"]

    procs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE) for _ in "ab"]
    codes = [p.wait(120) for p in procs]
    for proc in procs:
        proc.stderr.close()
    log = run("db", "log", "--json", env=_db(database_url))

    assert codes == [0, 0]
    runs = _json(log)["runs"]
    assert [r["plan"] for r in runs] == [["001", "002", "003", "004"]]
    assert run("db", "status", env=_db(database_url)).code == 0


def test_locked_out_then_killed_half_way_then_recovered(run, database_url: str) -> None:
    """A second migrate gives up with migration_locked; a kill -9 is explained by
    status and a rerun finishes the job."""
    env = _db(database_url)
    holder = _start_paused(database_url, "002")
    try:
        locked = run("db", "migrate", "--timeout", "1", env=env)
        locks = run("db", "locks", "--json", env=env)
        refused = run("db", "unlock", "--force", env=env)
    finally:
        _kill(holder)
    status = run("db", "status", "--json", env=env)
    rerun = run("db", "migrate", "--timeout", "30", env=env)
    log = run("db", "log", "--last", "5", "--json", env=env)

    assert locked.code == 8
    assert "error[migration_locked]" in locked.stderr
    assert _json(locks)["migration_lock"]["holder"]["pid"] == holder.pid
    assert _json(locks)["migration_lock"]["holder_alive"] is True
    assert refused.code == 8
    assert "error[migration_lock_holder_alive]" in refused.stderr
    assert status.code == 8
    interrupted = _json(status)["interrupted"]
    assert [(i["completed"], i["in_progress"]) for i in interrupted] == [
        (["001"], "002")
    ]
    assert _json(status)["current"] == "001"
    assert rerun.code == 0, rerun.stderr
    assert [r["result"] for r in _json(log)["runs"]] == ["succeeded", "interrupted"]
    assert run("db", "status", env=env).code == 0


def test_after_a_kill_unlock_and_resolve_instead_of_rerun(
    run, database_url: str
) -> None:
    """The lock row a killed run leaves is released (and logged) by unlock --force;
    its interrupted revision is settled by resolve."""
    env = _db(database_url)
    _kill(_start_paused(database_url, "003"))

    unlocked = run("db", "unlock", "--force", "--json", env=env)
    locks = run("db", "locks", "--json", env=env)
    unlock_log = run("db", "log", "--last", "1", "--json", env=env)
    resolved = run("db", "resolve", "--version", "003", env=env)
    status = run("db", "status", "--json", env=env)

    assert unlocked.code == 0, unlocked.stderr
    assert _json(unlocked)["released"] is True
    assert _json(unlocked)["lock"]["stale"] is True
    assert _json(locks)["migration_lock"]["holder"] is None
    assert _json(unlock_log)["runs"][0]["command"] == "unlock"
    assert resolved.code == 0, resolved.stderr
    assert "cleared failure" in resolved.stdout
    assert _json(status)["interrupted"] == []
    assert _json(status)["failed"] == []
    assert _json(status)["pending"] == ["003", "004"]


def test_unlock_alive_holder_on_postgres_ends_its_session(
    run, postgres_url: str
) -> None:
    """--i-know-it-is-alive terminates the holder's session; its migration fails."""
    env = _db(postgres_url)
    holder = _start_paused(postgres_url, "002")
    try:
        unlocked = run(
            "db", "unlock", "--force", "--i-know-it-is-alive", "--json", env=env
        )
        locks = run("db", "locks", "--json", env=env)
    finally:
        _kill(holder)

    assert unlocked.code == 0, unlocked.stderr
    assert _json(unlocked)["lock"]["holder"]["pid"] == holder.pid
    assert _json(locks)["migration_lock"]["held"] is False


def test_locks_on_postgres_lists_blocked_sessions(run, postgres_url: str) -> None:
    """A session waiting on another's row lock shows with who blocks it."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE t (id int PRIMARY KEY)")
        setup.execute("INSERT INTO t VALUES (1)")
    blocker = psycopg.connect(postgres_url)
    blocker.execute("UPDATE t SET id = 1 WHERE id = 1")
    blocker_pid = blocker.info.backend_pid
    waiter = subprocess.Popen(
        ["psql", postgres_url, "-c", "UPDATE t SET id = 1 WHERE id = 1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            locks = run("db", "locks", "--json", env=_db(postgres_url))
            blocked = _json(locks)["blocked_sessions"]
            if blocked:
                break
            time.sleep(0.1)
    finally:
        blocker.rollback()
        blocker.close()
        waiter.wait(30)

    assert blocked
    assert blocked[0]["blocked_by"] == [blocker_pid]


def test_pool_commands_without_a_server(run) -> None:
    """db pool status with no server: server_unreachable, exit 6."""
    result = run("db", "pool", "status", env={"REQUIEM_URL": "http://127.0.0.1:9"})

    assert result.code == 6
    assert result.stderr.startswith("requiem: error[server_unreachable]:")


def test_colon_alias_in_a_real_process(cli, database_url: str) -> None:
    """`requiem db:ping` is `requiem db ping` (the runbook's spelling), end to end."""
    result = cli("db:ping", env=_db(database_url))

    assert result.code == 0, result.stderr
    assert result.stdout.startswith("ok ")


def test_pool_commands_against_a_running_server(run, home) -> None:
    """status, leaks, drain and reset reach a real `requiem serve` and show its pool."""
    from live_keys import make_key
    from live_server import start

    server = start(home)
    try:
        key = make_key(server.env, "ops", "admin", operator=True)
        env = {"REQUIEM_URL": server.url, "REQUIEM_API_KEY": key}

        status = run("db", "pool", "status", "--json", env=env)
        leaks = run("db", "pool", "leaks", "--threshold-s", "3600", env=env)
        drained = run("db", "pool", "drain", "--timeout", "5", "--json", env=env)
        reset = run("db:pool:reset", "--json", env=env)
        refused = run("db", "pool", "status", env={**env, "REQUIEM_API_KEY": "nope"})
    finally:
        server.stop()

    assert status.code == 0, status.stderr
    assert {"size", "checked_out", "waiters", "checkouts_total"} <= set(_json(status))
    assert leaks.code == 0
    assert leaks.stdout.startswith("no connection held longer than 3600 s")
    assert drained.code == 0, drained.stderr
    assert _json(drained)["drained"] is True
    assert _json(reset)["draining"] is False
    assert refused.code == 7
