"""Migrations on a real database (SQLite and PostgreSQL): schema, history, repairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text, update

from requiem import settings
from requiem.store import db, migrate, revisions
from requiem.store.bootstrap import ensure_schema
from requiem.store.errors import (
    ChecksumMismatch,
    DatabaseRevisionUnknown,
    MigrationFailed,
    RevisionNotFailed,
    RollbackOutOfRange,
    SchemaNotCurrent,
    UnknownRevision,
)
from requiem.store.history import BOOKKEEPING, revisions_table, runs_table
from requiem.store.models import Base


@pytest.fixture
def engine(database_url: str):
    engine = db.make_engine(settings.load(), database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def migrator(engine: Engine) -> migrate.Migrator:
    return migrate.Migrator(engine, settings.load(), timeout_s=10)


def _differences(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn), [Base.metadata, BOOKKEEPING]
        )


def _schema(engine: Engine) -> dict:
    """Tables with their columns (name, type, nullable) and indexes."""
    found = inspect(engine)
    return {
        table: (
            [
                (c["name"], str(c["type"]), c["nullable"])
                for c in found.get_columns(table)
            ],
            sorted(
                (i["name"], tuple(i["column_names"])) for i in found.get_indexes(table)
            ),
        )
        for table in sorted(found.get_table_names())
    }


def test_migrated_schema_equals_the_models(engine: Engine) -> None:
    """ensure_schema builds exactly what models.py declares, nothing more or less."""
    ensure_schema(engine)

    assert _differences(engine) == []
    with engine.connect() as conn:
        assert revisions.current_revision(conn) == revisions.head()


def test_chain_is_numbered_in_order() -> None:
    """Revision ids read as the runbook writes them: 001, 002, …"""
    chain = revisions.chain()

    assert chain[:4] == ("001", "002", "003", "004")
    assert list(chain) == sorted(chain)


def test_every_revision_goes_down_and_up_again_to_the_same_schema(
    engine: Engine, migrator: migrate.Migrator
) -> None:
    """For each revision: up, down one step, up again gives the identical schema."""
    for revision in revisions.chain():
        migrator.upgrade(revision)
        before = _schema(engine)

        migrator.rollback(steps=1)
        migrator.upgrade(revision)

        assert _schema(engine) == before, revision
    migrator.rollback(steps=len(revisions.chain()))
    assert set(_schema(engine)) <= {"alembic_version", *BOOKKEEPING.tables}


def test_ensure_schema_twice_records_one_run(
    engine: Engine, migrator: migrate.Migrator
) -> None:
    """The second call finds the database at head and does nothing."""
    ensure_schema(engine)
    ensure_schema(engine)

    runs = migrator.log(10)
    assert len(runs) == 1
    assert runs[0]["result"] == "succeeded"
    assert runs[0]["plan"] == list(revisions.chain())
    assert [s["checksum"] for s in runs[0]["steps"]] == [
        revisions.checksum(r) for r in revisions.chain()
    ]
    assert runs[0]["pid"] > 0 and runs[0]["host"]


def test_ensure_schema_never_undoes_a_rollback(
    engine: Engine, migrator: migrate.Migrator
) -> None:
    """After `db rollback`, commands refuse the old schema instead of re-migrating."""
    migrator.upgrade()
    migrator.rollback(to="002")

    with pytest.raises(SchemaNotCurrent) as caught:
        ensure_schema(engine)

    assert caught.value.exit_code == 8
    assert "requiem db migrate" in caught.value.message
    assert migrator.status()["current"] == "002"


def test_rollback_to_and_steps(engine: Engine, migrator: migrate.Migrator) -> None:
    """--to 002 keeps 002; --steps 1 undoes exactly one revision."""
    migrator.upgrade()

    to_002 = migrator.rollback(to="002")
    one_step = migrator.rollback(steps=1)

    assert to_002.plan == list(reversed(revisions.chain()[2:]))
    assert to_002.to_revision == "002"
    assert one_step.plan == ["002"]
    assert one_step.to_revision == "001"
    assert migrator.status()["pending"] == list(revisions.chain()[1:])
    assert not inspect(engine).has_table("executions")
    assert inspect(engine).has_table("tenants")


def test_bad_rollback_targets(migrator: migrate.Migrator) -> None:
    """Unknown revision, past the first revision, and above the current one."""
    migrator.upgrade("002")

    with pytest.raises(UnknownRevision) as unknown:
        migrator.rollback(to="999")
    with pytest.raises(RollbackOutOfRange) as too_far:
        migrator.rollback(steps=3)
    with pytest.raises(RollbackOutOfRange) as above:
        migrator.rollback(to="003")

    assert unknown.value.code == "unknown_revision"
    assert unknown.value.exit_code == 2
    assert too_far.value.code == "rollback_out_of_range"
    assert above.value.code == "rollback_out_of_range"


def test_failed_revision_stops_the_run_and_is_recorded(
    engine: Engine, migrator: migrate.Migrator
) -> None:
    """003 fails on a table in its way: 001-002 stay, 003 rolls back, marked failed."""
    migrator.upgrade("002")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE audit_runs (x INTEGER)"))

    with pytest.raises(MigrationFailed) as failed:
        migrator.upgrade()
    status = migrator.status()
    last = migrator.log(1)[0]

    assert failed.value.code == "migration_failed"
    assert failed.value.exit_code == 5
    assert "revision 003 failed" in failed.value.message
    assert status["current"] == "002"
    assert status["failed"] == ["003"]
    assert not inspect(engine).has_table("audit_entries")  # 003 rolled back whole
    assert last["result"] == "failed"
    assert last["error"].startswith("003:")


def test_rerun_after_the_manual_fix_applies_the_failed_revision(
    engine: Engine, migrator: migrate.Migrator
) -> None:
    """Removing what was in the way and migrating again gets to head."""
    migrator.upgrade("002")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE audit_runs (x INTEGER)"))
    with pytest.raises(MigrationFailed):
        migrator.upgrade()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_runs"))

    report = migrator.upgrade()

    assert report.plan == list(revisions.chain()[2:])
    assert migrator.status()["failed"] == []
    assert _differences(engine) == []


def test_resolve_a_failed_revision(migrator: migrate.Migrator, engine: Engine) -> None:
    """resolve clears a failure once; a second resolve finds nothing failed."""
    migrator.upgrade("002")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE audit_runs (x INTEGER)"))
    with pytest.raises(MigrationFailed):
        migrator.upgrade()

    outcome = migrator.resolve("003")
    with pytest.raises(RevisionNotFailed) as again:
        migrator.resolve("003")

    assert outcome["action"] == "cleared failure"
    assert migrator.status()["failed"] == []
    assert migrator.status()["pending"] == list(revisions.chain()[2:])
    assert again.value.code == "revision_not_failed"
    assert migrator.log(1)[0]["command"] == "resolve"


def test_resolve_applied_stamps_the_revision(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """--applied records that a manual fix made the revision's changes."""
    migrator.upgrade("003")
    with engine.begin() as conn:
        conn.execute(
            text("CREATE INDEX ix_cas_ownership_digest ON cas_ownership (digest)")
        )
    with pytest.raises(MigrationFailed):
        migrator.upgrade("004")

    migrator.resolve("004", applied=True)

    assert migrator.status()["current"] == "004"
    assert _differences(engine) == []


def test_changed_revision_file_is_reported_and_refused_until_resolved(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """A recorded checksum that no longer matches the file blocks migrate."""
    migrator.upgrade("003")
    with engine.begin() as conn:
        conn.execute(
            update(revisions_table)
            .where(revisions_table.c.revision == "002")
            .values(checksum="0" * 64)
        )

    status = migrator.status()
    with pytest.raises(ChecksumMismatch) as refused:
        migrator.upgrade()
    outcome = migrator.resolve("002")
    report = migrator.upgrade()

    assert status["modified"] == ["002"]
    assert refused.value.code == "migration_checksum_mismatch"
    assert refused.value.exit_code == 8
    assert outcome["action"] == "accepted new checksum"
    assert report.plan == list(revisions.chain()[3:])
    with engine.connect() as conn:
        resolved_by = conn.execute(
            select(revisions_table.c.resolved_by).where(
                revisions_table.c.revision == "002"
            )
        ).scalar_one()
    assert resolved_by


def test_dry_run_prints_sql_and_changes_nothing(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """Offline SQL for the pending revisions; the database stays empty."""
    plan, sql = migrator.dry_run()

    assert plan == list(revisions.chain())
    assert "CREATE TABLE tenants" in sql
    assert "CREATE INDEX ix_cas_ownership_digest" in sql
    assert inspect(engine).get_table_names() == []


def test_estimate_counts_rows_and_flags_large_tables(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """004 indexes cas_ownership: its rows are counted and a large table is flagged."""
    migrator.upgrade("003")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, name, status, is_operator, created_at,"
                " updated_at) VALUES ('t_1', 'one', 'active', false,"
                " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        for n in range(5):
            conn.execute(
                text(
                    "INSERT INTO cas_ownership (tenant_id, digest, created_at)"
                    " VALUES ('t_1', :d, CURRENT_TIMESTAMP)"
                ),
                {"d": f"{n:064x}"},
            )

    small = migrator.estimate()
    flagged = migrator.estimate(large_rows=5)

    assert small[0]["revision"] == "004"
    assert small[0]["touches"] == {"cas_ownership": 5}
    assert small[0]["large_tables"] == []
    assert flagged[0]["large_tables"] == ["cas_ownership"]


def test_migrate_and_rollback_are_audited(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """A migration leaves an audit entry naming the action, run and plan."""
    migrator.upgrade()

    with engine.connect() as conn:
        entries = [
            json.loads(row)
            for row in conn.execute(text("SELECT entry FROM audit_pending")).scalars()
        ]

    migrations = [e for e in entries if e["action"] == "db.migrate"]
    assert len(migrations) == 1
    assert migrations[0]["outcome"] == "success"
    assert json.loads(migrations[0]["details_json"])["plan"] == list(revisions.chain())


def test_sqlite_backup_before_changing_a_database(home: Path) -> None:
    """Migrating an SQLite file with a schema first copies it into backups/."""
    config = settings.load()
    engine = db.make_engine(config)
    migrator = migrate.Migrator(engine, config)
    migrator.upgrade("002")

    report = migrator.upgrade()

    backup = Path(report.backup)
    assert backup.parent == home / "backups"
    copy = db.make_engine(config, f"sqlite:///{backup}")
    with copy.connect() as conn:
        assert revisions.current_revision(conn) == "002"
    copy.dispose()
    engine.dispose()


def test_run_rows_hold_who_where_and_how_long(
    migrator: migrate.Migrator, engine: Engine
) -> None:
    """Each run row: actor, host, pid, from → to, duration, result."""
    migrator.upgrade()

    with engine.connect() as conn:
        row = conn.execute(select(runs_table)).mappings().one()

    assert row["command"] == "migrate"
    assert row["from_revision"] is None
    assert row["to_revision"] == revisions.head()
    assert row["duration_ms"] >= 0
    assert row["actor"]


def test_timeout_bounds_lock_waits_on_postgres(postgres_url: str) -> None:
    """--timeout: a revision waiting on another session's table lock fails in time."""
    import psycopg

    engine = db.make_engine(settings.load(), postgres_url)
    migrate.Migrator(engine, settings.load()).upgrade("003")
    holder = psycopg.connect(postgres_url)
    holder.execute("LOCK TABLE cas_ownership IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(MigrationFailed) as failed:
            migrate.Migrator(engine, settings.load(), timeout_s=1).upgrade()
    finally:
        holder.rollback()
        holder.close()
    status = migrate.Migrator(engine, settings.load()).status()
    engine.dispose()

    assert "timeout" in failed.value.message  # lock_timeout or statement_timeout
    assert status["current"] == "003"
    assert status["failed"] == ["004"]


def test_database_ahead_of_this_code_is_refused(engine: Engine) -> None:
    """A revision id the code does not know: database_revision_unknown, not a guess."""
    ensure_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '999'"))

    with pytest.raises(DatabaseRevisionUnknown) as ahead:
        ensure_schema(engine)

    assert ahead.value.code == "database_revision_unknown"
    assert ahead.value.exit_code == 8
