"""The audit routes on a real server (127.0.0.1), and secrets sent over HTTP.

One server runs per test in a thread with its own REQUIEM_HOME; tenants and keys are
created in its database first: an operator tenant ``ops`` and two customer tenants.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from requiem import settings as settings_module
from requiem.api.app import create_app
from requiem.control import audit, credentials, tenants
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory, transaction

# Planted in requests; none may be found in any audit entry afterwards.
FAKE_KEY = "rqm_" + "S3cr3tKeyMaterial" * 3
FAKE_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJlLXNlY3JldA"
DB_PASSWORD = "hunter2-db-password"


@dataclass
class Live:
    url: str
    sessions: object
    ops_key: str
    acme_key: str
    acme_id: str
    other_key: str
    other_id: str

    def call(self, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.request(
            method, self.url + path, headers=headers, timeout=30, **kwargs
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def live(home: Path) -> Iterator[Live]:
    config = settings_module.load()
    engine = make_engine(config)
    ensure_schema(engine)
    sessions = session_factory(engine)
    keys = {}
    with transaction(sessions) as session:
        for name, operator in (("ops", True), ("acme", False), ("other", False)):
            tenant = tenants.create(session, name, is_operator=operator)
            key, _ = credentials.generate(
                session, config.secret_key, tenant=tenant.id, role="admin", name="t"
            )
            keys[name] = (key, tenant.id)

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started
    try:
        yield Live(
            f"http://127.0.0.1:{port}",
            sessions,
            keys["ops"][0],
            keys["acme"][0],
            keys["acme"][1],
            keys["other"][0],
            keys["other"][1],
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.dispose()


def test_a_tenant_admin_searches_only_its_own_entries(live: Live):
    """acme's admin never sees other's entries, even asking for them by tenant."""
    for tenant_id in (live.acme_id, live.other_id):
        audit.record(live.sessions, "budget.set", tenant_id=tenant_id, actor="u1")
    assert live.call("POST", "/api/admin/audit/flush", live.ops_key).status_code == 200

    own = live.call("GET", "/api/admin/audit/search", live.acme_key).json()
    asked = live.call(
        "GET",
        "/api/admin/audit/search",
        live.acme_key,
        params={"tenant": live.other_id},
    ).json()
    everything = live.call(
        "GET", "/api/admin/audit/search", live.ops_key, params={"limit": 1000}
    ).json()

    assert own["count"] >= 2
    assert {e["tenant_id"] for e in own["entries"]} == {live.acme_id}
    assert asked == {"entries": [], "count": 0}
    seen = {e["tenant_id"] for e in everything["entries"]}
    assert {live.acme_id, live.other_id} <= seen


def test_search_by_user_and_time(live: Live):
    audit.record(live.sessions, "user.login", tenant_id=live.acme_id, actor="user_7")
    live.call("POST", "/api/admin/audit/flush", live.ops_key)

    found = live.call(
        "GET",
        "/api/admin/audit/search",
        live.ops_key,
        params={"user": "user_7", "since": "24h ago"},
    ).json()
    future = live.call(
        "GET",
        "/api/admin/audit/search",
        live.ops_key,
        params={"user": "user_7", "since": "2999-01-01"},
    ).json()

    assert [e["action"] for e in found["entries"]] == ["user.login"]
    assert future["count"] == 0


def test_a_bad_time_is_400_invalid_time(live: Live):
    answer = live.call(
        "GET", "/api/admin/audit/search", live.ops_key, params={"since": "lately"}
    )

    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_time"


def test_flush_pending_status_need_an_operator_admin(live: Live):
    anonymous = live.call("GET", "/api/admin/audit/status", None)
    tenant_admin = live.call("POST", "/api/admin/audit/flush", live.acme_key)

    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (
        401,
        "unauthenticated",
    )
    assert (tenant_admin.status_code, tenant_admin.json()["error"]["code"]) == (
        403,
        "forbidden",
    )


def test_flush_then_status_and_pending_show_the_head(live: Live):
    audit.record(live.sessions, "flag.set", tenant_id=live.acme_id)

    flushed = live.call("POST", "/api/admin/audit/flush", live.ops_key).json()
    pending = live.call("GET", "/api/admin/audit/pending", live.ops_key).json()
    status = live.call("GET", "/api/admin/audit/status", live.ops_key).json()
    verified = live.call("POST", "/api/admin/audit/verify", live.ops_key).json()

    assert pending["count"] == 0
    assert status["head_seq"] == flushed["head_seq"] >= 1
    assert status["head_hash"] == flushed["head_hash"]
    assert status["flusher"]["running"] is True
    assert verified["ok"] is True
    assert verified["head_seq"] >= flushed["head_seq"]
    exposed = live.call("GET", "/api/metrics", None).text
    for name in (
        "requiem_audit_pending ",
        "requiem_audit_lag_seconds ",
        "requiem_audit_entries_total ",
        "requiem_audit_verify_failures_total ",
    ):
        assert f"\n{name}" in exposed, name


def test_secrets_sent_over_http_never_reach_the_audit_log(live: Live, cli):
    """Failed logins with keys or tokens, a flag change, a record: all scrubbed."""
    live.call("GET", "/api/admin/audit/status", FAKE_KEY)
    live.call("GET", "/api/admin/audit/status", FAKE_JWT)
    live.call("GET", "/api/admin/flags", "not-even-a-key-" + DB_PASSWORD)
    live.call(
        "POST",
        "/api/admin/flags/maintenance",
        live.ops_key,
        json={"value": False},
        headers={"X-Request-ID": FAKE_KEY},
    )
    audit.record(
        live.sessions,
        "settings.change",
        tenant_id=live.acme_id,
        target=f"postgresql://app:{DB_PASSWORD}@db:5432/requiem",
        details={
            "password": DB_PASSWORD,
            "nested": [{"apiKey": "plain-value"}, {"header": f"Bearer {FAKE_KEY}"}],
            "note": f"used {FAKE_JWT} and {FAKE_KEY}",
            "Authorization": "whatever",
        },
    )
    live.call("POST", "/api/admin/audit/flush", live.ops_key)

    with live.sessions() as session:
        rows = session.execute(text("SELECT * FROM audit_entries")).all()
    stored = json.dumps([list(map(str, row)) for row in rows])
    exported = cli("audit", "export").stdout

    failures = [r for r in rows if r.action == "auth.failure"]
    assert len(failures) == 3
    assert "[redacted]" in stored
    for secret in (FAKE_KEY, FAKE_JWT, DB_PASSWORD, "plain-value", "whatever"):
        assert secret not in stored
        assert secret not in exported
    assert ops_prefix_kept(stored, live.ops_key)


def ops_prefix_kept(stored: str, key: str) -> bool:
    """The 12-character display prefix of a key is not secret and is kept."""
    return key[: credentials.DISPLAY_CHARS] in stored


def test_the_cli_talks_to_the_running_server(live: Live, cli):
    audit.record(live.sessions, "flag.set")
    env = {"REQUIEM_URL": live.url, "REQUIEM_API_KEY": live.ops_key}

    flushed = cli("audit:flush", "--json", env=env)
    refused = cli("audit", "pending", env={**env, "REQUIEM_API_KEY": live.acme_key})

    assert flushed.code == 0, flushed.stderr
    assert "acting on the database" not in flushed.stderr
    head = live.call("GET", "/api/admin/audit/status", live.ops_key).json()
    assert json.loads(flushed.stdout)["head_seq"] == head["head_seq"] >= 1
    assert head["pending"] == 0
    assert refused.code == 7
    assert "error[forbidden]" in refused.stderr
