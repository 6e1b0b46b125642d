"""Metrics the alerts read: the error rate's numerator and ``requiem_database_up``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import create_engine

from requiem import settings
from requiem.api.app import create_app


def errors_total(code: str | None = None) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "requiem_errors":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and code in (None, sample.labels["code"]):
                total += sample.value
    return total


@pytest.fixture
def app(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REQUIEM_WORK_DIR", str(home / "work"))
    return create_app(settings.load())


def test_planned_503s_do_not_count_as_errors(app):
    with TestClient(app) as client:
        before = errors_total()
        app.state.service.draining = True
        health = client.get("/api/health")
        refused = client.get("/api/v1/executions")
        app.state.service.draining = False
        after = errors_total()

    assert health.status_code == 503
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert after == before


def test_a_fault_counts_under_its_real_code(app, monkeypatch: pytest.MonkeyPatch):
    async def broken() -> None:
        raise RuntimeError("probe exploded")

    with TestClient(app) as client:
        before = errors_total("internal_error")
        monkeypatch.setattr(app.state.service, "health", broken)
        answer = client.get("/api/health")

    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert errors_total("internal_error") == before + 1


def test_database_up_turns_0_when_the_database_cannot_be_reached(app, tmp_path: Path):
    service = app.state.service
    with TestClient(app) as client:
        up = client.get("/api/metrics").text
        reachable = service.db
        service.db = create_engine(f"sqlite:///{tmp_path}/missing/dir/db.sqlite")
        service._health_at = float("-inf")
        down = client.get("/api/metrics").text
        health = client.get("/api/health")
        service.db.dispose()
        service.db = reachable

    assert "requiem_database_up 1.0" in up.splitlines()
    assert "requiem_database_up 0.0" in down.splitlines()
    assert health.status_code == 503
    assert health.json()["checks"]["database"]["ok"] is False
