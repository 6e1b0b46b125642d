"""Store timings: migrating an empty database, ensure_schema when already current,
ping round trips, and what the pool monitor adds to each checkout.

    python bench/bench_store.py [--quick] [--postgres URL]

SQLite always; PostgreSQL when --postgres (or REQUIEM_TEST_POSTGRES_URL) names a
server whose user may create databases. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from requiem import settings
from requiem.store import db
from requiem.store.bootstrap import ensure_schema
from requiem.store.pool import PoolMonitor


def _ms(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and p95 of ``fn`` in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def bench(label: str, url: str, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as home:
        _bench(label, url, repeat, settings.load({"REQUIEM_HOME": home}))


def _bench(label: str, url: str, repeat: int, config: settings.Settings) -> None:
    engine = db.make_engine(config, url)

    started = time.perf_counter()
    ensure_schema(engine)
    cold = (time.perf_counter() - started) * 1000
    warm = _ms(lambda: ensure_schema(engine), repeat)
    ping = _ms(lambda: db.ping(engine), repeat)

    def checkout() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    plain = _ms(checkout, repeat * 5)
    PoolMonitor(engine)
    watched = _ms(checkout, repeat * 5)
    engine.dispose()

    print(f"{label}: migrate empty → head {cold:.0f} ms")
    print(
        f"{label}: ensure_schema when current median {warm[0]:.2f} ms p95 {warm[1]:.2f}"
    )
    print(f"{label}: ping (pooled)      median {ping[0]:.2f} ms p95 {ping[1]:.2f}")
    print(
        f"{label}: checkout + SELECT 1         median {plain[0]:.3f} ms plain,"
        f" {watched[0]:.3f} ms with PoolMonitor"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--postgres", default=os.environ.get("REQUIEM_TEST_POSTGRES_URL")
    )
    args = parser.parse_args()
    repeat = 20 if args.quick else 200

    with tempfile.TemporaryDirectory() as folder:
        bench("sqlite", f"sqlite:///{Path(folder) / 'bench.db'}", repeat)

    if args.postgres:
        import psycopg

        name = f"requiem_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            bench("postgresql", f"{args.postgres.rsplit('/', 1)[0]}/{name}", repeat)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
