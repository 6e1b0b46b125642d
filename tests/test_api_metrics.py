"""Metrics the alerts read."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

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

