"""The running server (``requiem serve`` as a subprocess) over real HTTP on 127.0.0.1.

One server is shared by the module; each test makes its own tenants and keys, so
tests do not depend on one another.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import typer

from live_keys import make_key, make_key_with_id, set_budget, set_tenant_status
from live_server import Server, cli, server_env, start

SLEEP = "/bin/sleep"
CAT = "/bin/cat"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("api-home")
    running = start(home, REQUIEM_MAX_BODY_BYTES="65536")
    yield running
    assert running.stop() == 0, running.log()


def tenant_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def operator_key(server: Server) -> str:
    return make_key(server.env, tenant_name("op"), "operator")


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The response is the one error shape with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["ok"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body


def upload(client: httpx.Client, data: bytes) -> str:
    response = client.put("/api/v1/cas", content=data)
    assert response.status_code == 201, response.text
    return response.json()["digest"]


def run(client: httpx.Client, request: dict) -> httpx.Response:
    return client.post("/api/v1/executions", content=json.dumps(request))


# -- open routes -------------------------------------------------------------------


def test_health_is_open_ready_and_echoes_a_request_id(server: Server):
    response = httpx.get(f"{server.url}/api/health", headers={"X-Request-ID": "abc-1"})

    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and body["status"] == "ok"
    assert set(body["checks"]) == {"database", "cas", "engine", "sandbox", "flags"}
    assert response.headers["x-request-id"] == "abc-1"


def test_unknown_route_is_404_not_found_and_wrong_method_405(server: Server):
    with server.client() as client:
        assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
        assert_error(client.delete("/api/health"), 405, "method_not_allowed")


def test_openapi_documents_the_error_shape_and_no_422(server: Server):
    spec = httpx.get(f"{server.url}/api/openapi.json").json()

    post = spec["paths"]["/api/v1/executions"]["post"]
    assert {"201", "400", "401", "403", "404", "413", "429", "503"} <= set(
        post["responses"]
    )
    assert "422" not in json.dumps(spec["paths"])
    assert "ErrorBody" in spec["components"]["schemas"]


# -- authentication and roles ------------------------------------------------------


def test_no_key_is_401_unauthenticated(server: Server):
    with server.client() as client:
        assert_error(client.get("/api/v1/executions"), 401, "unauthenticated")


def test_wrong_key_is_401_invalid_api_key(server: Server):
    with server.client("rqm_not-a-key-this-server-made") as client:
        assert_error(client.get("/api/v1/executions"), 401, "invalid_api_key")


def test_revoked_key_is_401_api_key_revoked(server: Server):
    key, key_id = make_key_with_id(server.env, tenant_name("rev"), "viewer")
    with server.client(key) as client:
        assert client.get("/api/v1/executions").status_code == 200

        revoked = cli(server.env, "api-key", "revoke", "--id", key_id)
        assert revoked.returncode == 0, revoked.stderr

        # A verified key is cached for at most one second.
        deadline = time.monotonic() + 5
        response = client.get("/api/v1/executions")
        while response.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            response = client.get("/api/v1/executions")
        assert_error(response, 401, "api_key_revoked")


def test_viewer_cannot_execute_403_forbidden(server: Server):
    key = make_key(server.env, tenant_name("view"), "viewer")
    with server.client(key) as client:
        response = run(client, {"command": CAT})

    assert_error(response, 403, "forbidden")


def test_suspended_tenant_cannot_execute_or_upload_403_tenant_suspended(
    server: Server,
):
    name = tenant_name("susp")
    key = make_key(server.env, name, "operator")
    set_tenant_status(server.env, name, "suspended")

    with server.client(key) as client:
        assert_error(run(client, {"command": CAT}), 403, "tenant_suspended")
        assert_error(client.put("/api/v1/cas", content=b"x"), 403, "tenant_suspended")


def test_spent_budget_is_429_quota_exceeded(server: Server):
    name = tenant_name("broke")
    key = make_key(server.env, name, "operator")
    set_budget(server.env, name, "0")

    with server.client(key) as client:
        response = run(client, {"command": CAT})

    assert_error(response, 429, "quota_exceeded")
    assert response.headers["retry-after"] == "3600"


# -- bad bodies --------------------------------------------------------------------


def test_malformed_json_is_400_json_parse_error(server: Server, operator_key: str):
    with server.client(operator_key) as client:
        response = client.post("/api/v1/executions", content=b'{"command": ')

    assert_error(response, 400, "json_parse_error")


def test_oversized_body_is_413_by_length_and_by_stream(
    server: Server, operator_key: str
):
    big = b"x" * 70_000
    with server.client(operator_key) as client:
        declared = client.put("/api/v1/cas", content=big)
        streamed = client.put("/api/v1/cas", content=iter([big[:40_000], big[40_000:]]))

    assert_error(declared, 413, "body_too_large")
    assert_error(streamed, 413, "body_too_large")


def test_workspace_root_is_refused_over_http(server: Server, operator_key: str):
    with server.client(operator_key) as client:
        response = run(client, {"command": CAT, "workspace_root": "/etc"})

    body = assert_error(response, 400, "refused_over_http")
    assert body["error"]["details"] == {"field": "workspace_root"}


def test_leaving_the_sandbox_is_refused_for_ordinary_tenants(
    server: Server, operator_key: str
):
    with server.client(operator_key) as client:
        response = run(client, {"command": CAT, "policy": {"sandbox": False}})

    body = assert_error(response, 400, "refused_over_http")
    assert body["error"]["details"] == {"field": "policy.sandbox"}


# -- executions and the CAS --------------------------------------------------------


def test_execution_runs_records_lists_and_replays(server: Server, operator_key: str):
    with server.client(operator_key) as client:
        digest = upload(client, b"hello requiem\n")
        request = {"command": CAT, "argv": ["in.txt"], "inputs": {"in.txt": digest}}

        first = run(client, request)
        second = run(client, request)
        fetched = client.get(f"/api/v1/executions/{first.json()['id']}")
        page = client.get("/api/v1/executions", params={"limit": 1})
        rest = client.get(
            "/api/v1/executions",
            params={"limit": 1, "cursor": page.json()["next_cursor"]},
        )
        replay = client.post(f"/api/v1/executions/{first.json()['id']}/replay")
        stdout = client.get(f"/api/v1/cas/{first.json()['result']['stdout_digest']}")

    assert first.status_code == 201, first.text
    executed = first.json()
    assert executed["status"] == "succeeded" and executed["exit_code"] == 0
    assert executed["result"]["stdout"] == "hello requiem\n"
    assert re.fullmatch(r"[0-9a-f]{64}", executed["result_digest"])
    assert second.json()["cache_hit"] is True
    assert second.json()["result_digest"] == executed["result_digest"]
    assert fetched.json()["result"]["result_digest"] == executed["result_digest"]
    assert [e["id"] for e in page.json()["items"]] == [second.json()["id"]]
    assert [e["id"] for e in rest.json()["items"]] == [executed["id"]]
    assert replay.status_code == 200 and replay.json()["ok"] is True
    assert replay.json()["execution"]["replay_of"] == executed["id"]
    assert stdout.content == b"hello requiem\n"


def test_another_tenants_execution_and_object_are_404(server: Server):
    owner = make_key(server.env, tenant_name("own"), "operator")
    other = make_key(server.env, tenant_name("oth"), "admin")
    with server.client(owner) as client:
        digest = upload(client, b"private bytes")
        executed = run(client, {"command": CAT, "inputs": {"f": digest}}).json()

    with server.client(other) as client:
        execution = client.get(f"/api/v1/executions/{executed['id']}")
        replay = client.post(f"/api/v1/executions/{executed['id']}/replay")
        blob = client.get(f"/api/v1/cas/{digest}")
        head = client.head(f"/api/v1/cas/{digest}")
        borrowed = run(client, {"command": CAT, "inputs": {"f": digest}})
        listed = client.get("/api/v1/executions").json()["items"]

    assert_error(execution, 404, "execution_not_found")
    assert_error(replay, 404, "execution_not_found")
    assert_error(blob, 404, "cas_object_not_found")
    assert head.status_code == 404
    assert_error(borrowed, 404, "missing_input")
    assert listed == []


def test_cas_head_reports_size_and_bad_digest_is_400(server: Server, operator_key):
    with server.client(operator_key) as client:
        digest = upload(client, b"12345")
        head = client.head(f"/api/v1/cas/{digest}")
        bad = client.get("/api/v1/cas/not-a-digest")

    assert head.status_code == 200 and head.headers["content-length"] == "5"
    assert_error(bad, 400, "invalid_digest")


# -- flags -------------------------------------------------------------------------


def test_flags_need_an_operator_admin_and_unknown_flag_is_404(server: Server):
    admin = make_key(server.env, tenant_name("ops"), "admin", operator=True)
    tenant_admin = make_key(server.env, tenant_name("plain"), "admin")

    with server.client(admin) as client:
        unknown = client.post("/api/admin/flags/no_such_flag", content=b'{"value": 1}')
    with server.client(tenant_admin) as client:
        refused = client.get("/api/admin/flags/maintenance")

    assert_error(unknown, 404, "unknown_flag")
    assert_error(refused, 403, "forbidden")


def test_execution_pause_and_maintenance_gate_routes(server: Server, operator_key):
    admin = make_key(server.env, tenant_name("ops"), "admin", operator=True)
    with server.client(admin) as ops, server.client(operator_key) as client:
        # The runbook's curl line sends no JSON content type; it must still work.
        paused = ops.post(
            "/api/admin/flags/execution_pause",
            content=b'{"value": true}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        refused = run(client, {"command": CAT})
        reading = client.get("/api/v1/executions")
        ops.post("/api/admin/flags/execution_pause", json={"value": False})

        ops.post("/api/admin/flags/maintenance", json={"value": True})
        closed = client.get("/api/v1/executions")
        health = client.get("/api/health")
        admin_open = ops.get("/api/admin/flags/maintenance")
        reopened = ops.post("/api/admin/flags/maintenance", json={"value": False})
        after = client.get("/api/v1/executions")

    assert paused.status_code == 200, paused.text
    assert paused.json()["old_value"] is False and paused.json()["value"] is True
    assert assert_error(refused, 503, "execution_paused")
    assert refused.headers["retry-after"] == "30"
    assert reading.status_code == 200
    assert_error(closed, 503, "maintenance")
    assert closed.headers["retry-after"] == "30"
    assert health.status_code == 200
    assert admin_open.json()["value"] is True
    assert reopened.json()["old_value"] is True
    assert after.status_code == 200


# -- metrics and the CLI -----------------------------------------------------------


def test_metrics_use_route_templates_and_pass_promtool(server: Server, tmp_path):
    with server.client() as client:
        client.get("/api/v1/executions/ex_0123456789abcdef")
        text = client.get("/api/metrics").text

    for name in (
        "requiem_requests_total",
        "requiem_errors_total",
        "requiem_request_duration_bucket",
        "requiem_active_requests",
        "requiem_executions_total",
        "requiem_engine_oom_total",
        "requiem_cas_read_latency_bucket",
        "requiem_cas_objects",
        "requiem_cas_bytes",
        'requiem_flag_state{flag="execution_pause"}',
    ):
        assert name in text, name
    assert 'route="/api/v1/executions/{execution_id}"' in text
    assert "ex_0123456789abcdef" not in text

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (.ci/run installs it)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_status_and_flags_commands_talk_to_the_server(server: Server):
    admin = make_key(server.env, tenant_name("ops"), "admin", operator=True)
    env = {**server.env, "REQUIEM_URL": server.url, "REQUIEM_API_KEY": admin}

    status = cli(env, "status", "--json")
    unknown = cli(env, "flags", "set", "no_such_flag", "true")

    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["reachable"] is True and document["health"]["ready"] is True
    assert document["server"]["flags"] == {
        "execution_pause": False,
        "maintenance": False,
    }
    assert unknown.returncode == 3
    assert "error[unknown_flag]" in unknown.stderr


def test_pool_admin_routes_drain_refuse_and_reset(server: Server):
    admin = make_key(server.env, tenant_name("ops"), "admin", operator=True)
    with server.client(admin) as ops:
        status = ops.get("/api/admin/db/pool")
        leaks = ops.get("/api/admin/db/pool/leaks", params={"threshold_s": 0})
        drained = ops.post("/api/admin/db/pool/drain", params={"timeout_s": 5})
        refused = ops.get("/api/v1/executions")
        reset = ops.post("/api/admin/db/pool/reset")
        after = ops.get("/api/v1/executions")
        resumed = ops.get("/api/admin/audit/status")

    assert status.status_code == 200 and status.json()["draining"] is False
    assert leaks.json()["threshold_s"] == 0
    assert drained.json()["drained"] is True, drained.text
    assert_error(refused, 503, "pool_draining")
    assert reset.status_code == 200 and reset.json()["draining"] is False
    assert after.status_code == 200
    # the drain paused the audit flusher; the reset started it again
    assert resumed.json()["flusher"]["running"] is True, resumed.text


def test_serve_on_a_busy_port_says_address_in_use_and_exits_6(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = cli(server_env(tmp_path), "serve", "--port", str(port))

    assert result.returncode == 6, result.stderr
    assert "serving on" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"requiem: error[address_in_use]: 127.0.0.1:{port} is already in use; "
        "stop what holds it or choose --port"
    ]


def test_status_in_maintenance_keeps_flags_requests_and_pool_and_exits_6(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from requiem.cli import service_cmd

    admin = make_key(server.env, tenant_name("ops"), "admin", operator=True)
    monkeypatch.setenv("REQUIEM_URL", server.url)
    monkeypatch.setenv("REQUIEM_API_KEY", admin)
    with server.client(admin) as ops:
        ops.post("/api/admin/flags/maintenance", json={"value": True})
        try:
            with pytest.raises(typer.Exit) as as_json:
                service_cmd.status(as_json=True)
            document = json.loads(capsys.readouterr().out)
            with pytest.raises(typer.Exit) as as_text:
                service_cmd.status(as_json=False)
            text = capsys.readouterr().out
        finally:
            ops.post("/api/admin/flags/maintenance", json={"value": False})

    assert as_json.value.exit_code == 6 and as_text.value.exit_code == 6
    assert document["maintenance"] is True
    assert document["server"]["flags"]["maintenance"] is True
    assert document["server"]["active_requests"] >= 1
    assert "checked_out" in document["server"]["pool"]
    for row in ("maintenance", "flag maintenance", "active requests", "pool"):
        assert row in text, text
