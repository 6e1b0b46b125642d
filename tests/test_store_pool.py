"""PoolMonitor on a real engine: status, leaks with their request id, drain, reset."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from requiem import settings
from requiem.store import db
from requiem.store.errors import PoolDraining
from requiem.store.pool import PoolMonitor, current_request_id


@pytest.fixture
def monitored(database_url: str):
    engine = db.make_engine(settings.load(), database_url)
    monitor = PoolMonitor(engine)
    yield engine, monitor
    engine.dispose()


def test_status_counts_checkouts_and_what_is_held(monitored) -> None:
    """A held connection shows as checked out; returning it shows as checked in."""
    engine, monitor = monitored

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        during = monitor.status()
    after = monitor.status()

    assert during["checked_out"] == 1
    assert during["checkouts_total"] == 1
    assert during["size"] == engine.pool.size()
    assert after["checked_out"] == 0
    assert after["checked_in"] == 1
    assert after["waiters"] == 0
    assert after["draining"] is False


def test_leaks_name_the_request_and_the_code_that_holds_a_connection(
    monitored,
) -> None:
    """A connection held past the threshold is reported with request id and stack."""
    engine, monitor = monitored
    token = current_request_id.set("req_leaky")
    try:
        conn = engine.connect()
    finally:
        current_request_id.reset(token)

    leaks = monitor.leaks(0.0)
    none_yet = monitor.leaks(3600.0)
    conn.close()

    assert len(leaks) == 1
    assert leaks[0]["request_id"] == "req_leaky"
    assert any("test_store_pool.py" in frame for frame in leaks[0]["stack"])
    assert none_yet == []
    assert monitor.leaks(0.0) == []


def test_drain_refuses_new_checkouts_and_waits_for_returns(monitored) -> None:
    """Drain waits for the held connection, then checkouts fail until reset."""
    engine, monitor = monitored
    conn = engine.connect()
    timer = threading.Timer(0.3, conn.close)
    timer.start()

    result = monitor.drain(timeout_s=10)
    with pytest.raises(PoolDraining) as refused:
        engine.connect()
    status = monitor.reset()
    with engine.connect() as again:
        value = again.execute(text("SELECT 1")).scalar_one()

    assert result["drained"] is True
    assert result["checked_out"] == 0
    assert refused.value.code == "pool_draining"
    assert refused.value.http_status == 503
    assert status["draining"] is False
    assert value == 1


def test_drain_times_out_and_lists_who_still_holds(monitored) -> None:
    """A connection never returned makes drain give up and name its holder."""
    engine, monitor = monitored
    conn = engine.connect()

    result = monitor.drain(timeout_s=0.2)
    conn.close()

    assert result["drained"] is False
    assert result["checked_out"] == 1
    assert len(result["holders"]) == 1


def test_waiters_counted_while_the_pool_is_exhausted(database_url: str) -> None:
    """A caller blocked on a full pool shows up as a waiter."""
    config = settings.load(
        {"REQUIEM_DB_POOL_SIZE": "1", "REQUIEM_DB_MAX_OVERFLOW": "0"}
    )
    engine = db.make_engine(config, database_url)
    monitor = PoolMonitor(engine)
    first = engine.connect()
    seen: list[int] = []

    def wait_for_connection() -> None:
        with engine.connect():
            pass

    waiter = threading.Thread(target=wait_for_connection)
    waiter.start()
    for _ in range(100):
        seen.append(monitor.status()["waiters"])
        if seen[-1]:
            break
        threading.Event().wait(0.02)
    first.close()
    waiter.join(10)
    engine.dispose()

    assert seen[-1] == 1
    assert monitor.status()["waiters"] == 0
