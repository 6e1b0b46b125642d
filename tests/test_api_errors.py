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


@pytest.mark.parametrize("text", ["153", "2026-12-04", "2026-12-04T25:00:00Z"])
def test_since_and_until_take_rfc3339_only(text):
    from requiem.api.responses import BadRequest
    from requiem.api.routes_executions import parse_moment

    with pytest.raises(BadRequest) as refused:
        parse_moment("since", text)

    assert refused.value.code == "bad_request"
    assert parse_moment("until", "2026-12-04T15:00:00Z").isoformat() == (
        "2026-12-04T15:00:00+00:00"
    )
