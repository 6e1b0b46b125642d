"""How fast the audit log appends and verifies, on SQLite and PostgreSQL.

Append: 8 writer processes record entries in batches (``record_many``, one
transaction per batch, as a bulk job or a busy server's request mix would), while
the main process links pending entries into the chain the way the server's flusher
does. Reported: entries/s made durable, and entries/s linked end to end (from the
first write until the chain's head holds every entry). Verify: ``verify_database``
over the resulting chain, entries/s.

Also: the same verification on one process per core (``audit verify --workers``).

Goals: append >= 20,000/s on SQLite, >= 10,000/s on PostgreSQL; verify >= 200,000/s.
Prints numbers; asserts nothing. ``--quick`` runs a small size for ``make bench``.

    .venv/bin/python bench/bench_audit.py [--quick] [--entries N] [--writers W]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from requiem import settings
from requiem.control import audit, audit_chain, audit_service
from requiem.control.audit_keys import AuditSigner
from requiem.control.audit_verify import verify_database
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory

POSTGRES = os.environ.get(
    "REQUIEM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def writer(url: str, tag: str, count: int, batch: int) -> None:
    engine = make_engine(settings.load(), url)
    sessions = session_factory(engine)
    for start in range(0, count, batch):
        audit.record_many(
            sessions,
            (
                {
                    "action": "execution.finish",
                    "actor": f"key:{tag}",
                    "tenant_id": "t_bench",
                    "target": f"ex_{tag}_{n}",
                    "source": "api",
                    "request_id": f"req_{tag}_{n}",
                    "details": {"request_digest": "ab" * 32, "exit_code": 0, "n": n},
                }
                for n in range(start, min(start + batch, count))
            ),
        )
    engine.dispose()


def bench_backend(name: str, url: str, entries: int, writers: int, batch: int) -> None:
    config = settings.load()
    engine = make_engine(config, url)
    ensure_schema(engine)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        session.execute(text("DELETE FROM audit_pending"))
    signer = AuditSigner.load(config.audit_key_file)
    engine.dispose()  # no connection may cross the fork below

    per_writer = entries // writers
    total = per_writer * writers
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=writer, args=(url, f"w{i}", per_writer, batch))
        for i in range(writers)
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()

    linked, durable_at = 0, None
    while linked < total:
        report = audit_chain.link_pending(sessions, config, signer)
        linked = report.head_seq
        if durable_at is None and not any(p.is_alive() for p in procs):
            durable_at = time.perf_counter()
        if report.linked == 0:
            time.sleep(0.005)
    finished = time.perf_counter()
    for proc in procs:
        proc.join()
    durable_at = durable_at or finished

    verify_started = time.perf_counter()
    cpu_started = time.process_time()
    result = verify_database(sessions, signer.public_key)
    verify_s = time.perf_counter() - verify_started
    verify_cpu = time.process_time() - cpu_started
    parallel_started = time.perf_counter()
    audit_service.verify(
        sessions, signer.public_key, workers=os.cpu_count() or 1, parallel_min=1
    )
    parallel_s = time.perf_counter() - parallel_started
    engine.dispose()

    print(
        f"{name:10s} append: {total} entries, {writers} writers, batch {batch}: "
        f"durable {total / (durable_at - started):,.0f}/s, "
        f"linked {total / (finished - started):,.0f}/s"
    )
    print(
        f"{name:10s} verify: {result.checked} entries, {result.checkpoints} "
        f"checkpoints in {verify_s:.2f} s: {result.checked / verify_s:,.0f}/s "
        f"(one process; {result.checked / verify_cpu:,.0f}/s of its CPU time); "
        f"{os.cpu_count()} processes: {result.checked / parallel_s:,.0f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    entries = 16_000 if args.quick else args.entries

    with tempfile.TemporaryDirectory(prefix="requiem-bench-audit-") as home:
        os.environ["REQUIEM_HOME"] = home
        sqlite_url = f"sqlite:///{Path(home) / 'requiem.db'}"
        bench_backend("sqlite", sqlite_url, entries, args.writers, args.batch)
        try:
            import psycopg
            from psycopg import sql

            name = f"requiem_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3) as db:
                db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except Exception as exc:  # noqa: BLE001 - no server: report and skip
            print(f"postgresql skipped: {type(exc).__name__}: {exc}")
            return
        try:
            url = POSTGRES.rsplit("/", 1)[0] + "/" + name
            bench_backend("postgresql", url, entries, args.writers, args.batch)
        finally:
            with psycopg.connect(POSTGRES, autocommit=True) as db:
                db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s",
                    (name,),
                )
                db.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
