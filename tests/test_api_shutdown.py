"""SIGTERM: drain, finish what is in flight, record it, flush, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from live_keys import make_key
from live_server import start
from requiem import settings
from requiem.api.app import create_app
from requiem.store.db import make_engine, session_factory
from requiem.store.errors import PoolDraining
from requiem.store.models import AuditEntry, Execution
from requiem.store.pool import current_request_id


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.05)


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def run_slow_execution(server, key: str) -> tuple[threading.Thread, list]:
    """A thread posting a 2 s execution; its answer lands in the returned list."""
    slow = {"command": "/bin/sleep", "argv": ["2"], "policy": {"sandbox": False}}
    answers: list[httpx.Response] = []

    def run_slow() -> None:
        with server.client(key) as client:
            answers.append(client.post("/api/v1/executions", json=slow))

    worker = threading.Thread(target=run_slow)
    worker.start()
    return worker, answers


def assert_recorded_and_audited(server, executed: dict) -> None:
    engine = make_engine(settings.load(server.env))
    with session_factory(engine)() as session:
        row = session.get(Execution, executed["id"])
        audited = session.scalars(
            select(AuditEntry.target).where(AuditEntry.action == "execution.run")
        ).all()
    engine.dispose()
    assert row is not None and row.result_digest == executed["result_digest"]
    assert executed["id"] in audited


def test_execution_in_flight_at_sigterm_completes_is_recorded_and_exit_is_0(
    tmp_path: Path,
):
    server = start(
        tmp_path,
        REQUIEM_MAX_CONCURRENT_EXECUTIONS="1",
        REQUIEM_QUEUE_TIMEOUT_MS="300",
        REQUIEM_SHUTDOWN_GRACE_S="20",
    )
    key = make_key(server.env, "drain", "operator", operator=True)
    worker, answers = run_slow_execution(server, key)
    with server.client(key) as client:
        wait_for(lambda: client.get("/api/v1/status").json()["executions_running"] == 1)
        queued = client.post("/api/v1/executions", json={"command": "/bin/true"})

    server.process.send_signal(signal.SIGTERM)
    with server.client(key) as client:
        wait_for(lambda: client.get("/api/health").status_code == 503)
        health = client.get("/api/health")
        refused = client.get("/api/v1/executions")
        still_running = not answers
    worker.join(30)
    code = server.process.wait(30)

    assert still_running, "the execution ended before the checks; make it longer"
    assert health.json()["status"] == "draining"
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert queued.status_code == 429
    assert queued.json()["error"]["code"] == "execution_queue_full"
    assert queued.headers["retry-after"] == "1"
    assert answers and answers[0].status_code == 201, server.log()
    executed = answers[0].json()
    assert executed["status"] == "succeeded"
    assert code == 0, server.log()

    assert_recorded_and_audited(server, executed)


def test_second_sigterm_kills_the_running_children_and_exits(tmp_path: Path):
    server = start(tmp_path, REQUIEM_SHUTDOWN_GRACE_S="60")
    key = make_key(server.env, "force", "operator", operator=True)
    endless = {"command": "/bin/sleep", "argv": ["120"], "policy": {"sandbox": False}}

    def run_endless() -> None:
        with server.client(key) as client:
            try:
                client.post("/api/v1/executions", json=endless)
            except httpx.HTTPError:
                pass

    threading.Thread(target=run_endless, daemon=True).start()
    wait_for(lambda: bool(children_of(server.process.pid)))
    spawned = children_of(server.process.pid)

    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)

    assert code == 0, server.log()
    for pid in spawned:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), timeout=10)


def test_draining_turns_readiness_and_new_requests_to_503(
    home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("REQUIEM_WORK_DIR", str(home / "work"))
    app = create_app(settings.load())

    with TestClient(app) as client:
        app.state.service.draining = True
        health = client.get("/api/health")
        refused = client.get("/api/v1/executions")

    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert json.loads(refused.text)["ok"] is False


def test_runbook_shutdown_order_keeps_the_execution_in_flight(tmp_path: Path):
    """Pause → audit flush → pool drain → SIGTERM, with one execution running."""
    server = start(tmp_path, REQUIEM_SHUTDOWN_GRACE_S="20")
    key = make_key(server.env, "order", "admin", operator=True)
    worker, answers = run_slow_execution(server, key)
    with server.client(key) as ops:
        wait_for(lambda: ops.get("/api/v1/status").json()["executions_running"] == 1)
        paused = ops.post("/api/admin/flags/execution_pause", json={"value": True})
        flushed = ops.post("/api/admin/audit/flush")
        drained = ops.post("/api/admin/db/pool/drain", params={"timeout_s": 20})
        worker.join(30)
        health = ops.get("/api/health")
        late = ops.get("/api/v1/executions")
        time.sleep(0.5)  # the old flusher failed within 0.2 s of a drain
    code = server.stop()

    assert paused.status_code == 200 and flushed.status_code == 200
    assert drained.status_code == 200, drained.text
    assert drained.json()["drained"] is True
    assert drained.json()["in_flight"] == 0
    assert answers and answers[0].status_code == 201, answers[0].text
    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert health.json()["checks"]["database"]["ok"] is True
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "pool_draining"
    log_text = server.log()
    assert code == 0, log_text
    assert "Traceback" not in log_text
    assert "audit_flush_failed" not in log_text

    executed = answers[0].json()
    assert_recorded_and_audited(server, executed)


def test_drain_timing_out_still_lets_admitted_work_record_itself(
    home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("REQUIEM_WORK_DIR", str(home / "work"))
    app = create_app(settings.load())
    with TestClient(app):
        service = app.state.service
        report = service.pool.drain(0.1, ["req_admitted"])

        def checkout(request_id: str | None) -> None:
            token = current_request_id.set(request_id)
            try:
                with service.db.connect() as connection:
                    connection.execute(text("SELECT 1"))
            finally:
                current_request_id.reset(token)

        checkout("req_admitted")
        checkout(None)  # the group-commit writer records for admitted work
        with pytest.raises(PoolDraining):
            checkout("req_new")
        service.request_started("req_admitted")
        service.request_finished("req_admitted")
        with pytest.raises(PoolDraining):
            checkout(None)
        service.reset_pool()

    assert report["drained"] is False
    assert report["in_flight"] == 1
