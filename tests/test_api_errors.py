"""An unexpected fault: a 500 in the one shape, logged without secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from requiem import log, settings
from requiem.api.app import create_app


def test_a_fault_is_a_500_in_shape_and_its_log_holds_no_secret(
    home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
):
    monkeypatch.setenv("REQUIEM_WORK_DIR", str(home / "work"))
    log.configure("info")
    app = create_app(settings.load())
    secret = "rqm_this-must-never-be-logged-000000000000000000"

    def boom(authorization: str | None = None) -> None:
        raise RuntimeError("the disk caught fire")

    app.add_api_route("/api/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/boom", headers={"Authorization": secret})
    logged = capfd.readouterr().err

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in response.text and "fire" not in response.text
    assert "request_failed" in logged and "RuntimeError" in logged
    assert secret not in logged
