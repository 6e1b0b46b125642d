"""Attacks on the running service: tenants reaching for each other, bad credentials,
bad input, load beyond the execution slots, and the faults they uncovered.

Each test states what the product must do. A confirmed bug is marked
``xfail(strict=True)`` with the bug named, so the test turns red the moment the
product is fixed and the mark must go.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from live_keys import make_key, make_key_with_id
from live_server import Server, cli, start
from test_api_server import assert_error

ECHO = "/bin/echo"
SLEEP = "/bin/sleep"
OVER_INT_DIGITS = 5000  # over CPython's 4300-digit int conversion limit
FAR_TIME = "0001-01-01T00:00:00+14:00"  # valid ISO 8601, before datetime.min in UTC


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("attack-home")
    running = start(
        home,
        REQUIEM_MAX_BODY_BYTES="65536",
        REQUIEM_MAX_CONCURRENT_EXECUTIONS="1",
        REQUIEM_QUEUE_TIMEOUT_MS="300",
    )
    yield running
    running.stop()


def tenant(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def victim(server: Server) -> dict[str, str]:
    """Tenant A with an uploaded object and an execution that read it."""
    name = tenant("victim")
    key = make_key(server.env, name, "admin")
    with server.client(key) as client:
        stored = client.put("/api/v1/cas", content=b"victim's private bytes\n")
        assert stored.status_code == 201, stored.text
        digest = stored.json()["digest"]
        ran = client.post(
            "/api/v1/executions",
            json={"command": "/bin/cat", "argv": ["in"], "inputs": {"in": digest}},
        )
        assert ran.status_code == 201, ran.text
    return {"name": name, "key": key, "digest": digest, "execution": ran.json()["id"]}


@pytest.fixture
def intruder(server: Server) -> Iterator[httpx.Client]:
    with server.client(make_key(server.env, tenant("intruder"), "admin")) as client:
        yield client


# -- tenants reaching for each other -------------------------------------------


def test_another_tenants_execution_is_not_found(victim, intruder) -> None:
    execution = victim["execution"]
    assert_error(
        intruder.get(f"/api/v1/executions/{execution}"), 404, "execution_not_found"
    )
    assert_error(
        intruder.post(f"/api/v1/executions/{execution}/replay"),
        404,
        "execution_not_found",
    )
    listed = intruder.get("/api/v1/executions", params={"limit": 200})
    assert listed.status_code == 200
    assert execution not in {item["id"] for item in listed.json()["items"]}


def test_another_tenants_object_looks_exactly_like_an_absent_one(
    victim, intruder
) -> None:
    absent = "0" * 64
    assert_error(
        intruder.get(f"/api/v1/cas/{victim['digest']}"), 404, "cas_object_not_found"
    )
    theirs = intruder.head(f"/api/v1/cas/{victim['digest']}")
    nothing = intruder.head(f"/api/v1/cas/{absent}")
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.headers.get("content-length") == nothing.headers.get("content-length")


def test_another_tenants_digest_is_not_an_input(victim, intruder) -> None:
    response = intruder.post(
        "/api/v1/executions",
        json={"command": "/bin/cat", "argv": ["x"], "inputs": {"x": victim["digest"]}},
    )
    assert_error(response, 404, "missing_input")


def test_tenant_id_comes_from_the_key_only(victim, intruder) -> None:
    response = intruder.post(
        "/api/v1/executions", json={"command": ECHO, "tenant_id": victim["name"]}
    )
    assert_error(response, 403, "tenant_mismatch")
    spoofed = intruder.get(
        "/api/v1/executions", headers={"X-Tenant-ID": victim["name"]}
    )
    assert spoofed.status_code == 200
    assert spoofed.json()["items"] == []


def test_a_tenant_admin_searches_only_its_own_audit_entries(victim, intruder) -> None:
    asked = intruder.get("/api/admin/audit/search", params={"tenant": victim["name"]})
    assert asked.status_code == 200, asked.text
    assert asked.json()["entries"] == []
    # The entry is durable at once but joins the chain (and search) with the
    # flusher's next batch, within about a second.
    deadline = time.monotonic() + 10
    everything = []
    while not everything and time.monotonic() < deadline:
        everything = intruder.get("/api/admin/audit/search").json()["entries"]
        if not everything:
            time.sleep(0.2)
    assert everything, "the intruder's own key generation is audited"
    assert len({entry["tenant_id"] for entry in everything}) == 1


# -- authentication and roles ---------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "unauthenticated"),
        ("Bearer", "unauthenticated"),
        ("Basic dXNlcjpwYXNz", "unauthenticated"),
        ("Bearer rqm_", "invalid_api_key"),
        ("Bearer not-a-requiem-key", "invalid_api_key"),
        ("Bearer rqm_" + "A" * 43, "invalid_api_key"),
        ("Bearer rqm_\u00e9\u00e9".encode(), "invalid_api_key"),
        ("Bearer rqm_" + "a" * 20_000, "invalid_api_key"),
    ],
)
def test_bad_credentials_are_401(server: Server, authorization, code) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with server.client() as client:
        response = client.get("/api/v1/executions", headers=headers)
    assert_error(response, 401, code)


def test_revoked_key_is_refused_within_a_second(server: Server) -> None:
    key, key_id = make_key_with_id(server.env, tenant("revoked"), "viewer")
    with server.client(key) as client:
        assert client.get("/api/v1/executions").status_code == 200
        revoked = cli(server.env, "api-key", "revoke", "--id", key_id)
        assert revoked.returncode == 0, revoked.stderr
        for _ in range(40):
            response = client.get("/api/v1/executions")
            if response.status_code != 200:
                break
            threading.Event().wait(0.05)
    assert_error(response, 401, "api_key_revoked")


def test_roles_do_not_escalate(server: Server) -> None:
    name = tenant("roles")
    with server.client(make_key(server.env, name, "viewer")) as viewer:
        assert_error(
            viewer.post("/api/v1/executions", json={"command": ECHO}), 403, "forbidden"
        )
        assert_error(viewer.put("/api/v1/cas", content=b"x"), 403, "forbidden")
    with server.client(make_key(server.env, name, "admin")) as tenant_admin:
        for path in ("/api/admin/flags/maintenance", "/api/admin/db/pool/reset"):
            assert_error(
                tenant_admin.post(path, json={"value": True}), 403, "forbidden"
            )
        assert_error(tenant_admin.post("/api/admin/audit/verify"), 403, "forbidden")
        assert_error(
            tenant_admin.post(
                "/api/v1/executions",
                json={"command": ECHO, "policy": {"sandbox": False}},
            ),
            400,
            "refused_over_http",
        )


# -- bad input ----------------------------------------------------------------

CURSOR_GARBAGE = base64.urlsafe_b64encode(b"not a time|ex_1").decode()


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "status", "code"),
    [
        ("POST", "/api/v1/executions", None, b"", 400, "json_parse_error"),
        ("POST", "/api/v1/executions", None, b"{nope", 400, "json_parse_error"),
        ("POST", "/api/v1/executions", None, b"[]", 400, "invalid_request"),
        ("POST", "/api/v1/executions", None, b"[" * 50_000, 400, "json_parse_error"),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "command": "/bin/false"}',
            400,
            "json_duplicate_key",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "timeout_ms": NaN}',
            400,
            "json_parse_error",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/\xff"}',
            400,
            "json_parse_error",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "inputs": {"../x": "' + b"0" * 64 + b'"}}',
            400,
            "path_escape",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "outputs": ["/etc/passwd"]}',
            400,
            "path_escape",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "cwd": "a\\u0000"}',
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/executions",
            None,
            b'{"command": "/bin/true", "workspace_root": "/"}',
            400,
            "refused_over_http",
        ),
        ("POST", "/api/v1/executions", None, b"x" * 70_000, 413, "body_too_large"),
        ("GET", "/api/v1/executions", {"limit": "-1"}, None, 400, "bad_request"),
        ("GET", "/api/v1/executions", {"limit": "10" * 20}, None, 400, "bad_request"),
        ("GET", "/api/v1/executions", {"limit": "abc"}, None, 400, "bad_request"),
        ("GET", "/api/v1/executions", {"status": "x"}, None, 400, "bad_request"),
        ("GET", "/api/v1/executions", {"since": "x"}, None, 400, "bad_request"),
        ("GET", "/api/v1/executions", {"cursor": "-1"}, None, 400, "invalid_cursor"),
        (
            "GET",
            "/api/v1/executions",
            {"cursor": CURSOR_GARBAGE},
            None,
            400,
            "invalid_cursor",
        ),
        ("GET", "/api/v1/executions", {"x": "1"}, None, 400, "unknown_parameter"),
        ("GET", "/api/v1/cas/" + "A" * 64, None, None, 400, "invalid_digest"),
        ("GET", "/api/v1/cas/" + "0" * 63, None, None, 400, "invalid_digest"),
        ("GET", "/api/v1/cas/" + "\u0660" * 64, None, None, 400, "invalid_digest"),
        ("GET", "/api/v1/cas/%2e%2e%2fetc", None, None, 404, "not_found"),
        ("DELETE", "/api/v1/cas/" + "0" * 64, None, None, 405, "method_not_allowed"),
        ("GET", "/api/v1/executions/ex_%00", None, None, 400, "bad_request"),
        (
            "GET",
            "/api/admin/audit/search",
            {"since": "garbage"},
            None,
            400,
            "invalid_time",
        ),
        ("GET", "/api/admin/audit/search", {"limit": "0"}, None, 400, "bad_request"),
    ],
)
def test_bad_input_gets_its_code(
    server: Server, method, path, params, body, status, code
) -> None:
    key = make_key(server.env, tenant("input"), "admin")
    with server.client(key) as client:
        response = client.request(method, path, params=params, content=body)
    assert_error(response, status, code)


def test_chunked_body_over_the_limit_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 4096

    with server.client(make_key(server.env, tenant("chunk"), "operator")) as client:
        response = client.put("/api/v1/cas", content=chunks())
    assert_error(response, 413, "body_too_large")


def test_huge_integer_in_json_is_a_parse_error(server: Server) -> None:
    body = b'{"command": "/bin/true", "timeout_ms": ' + b"1" * OVER_INT_DIGITS + b"}"
    with server.client(make_key(server.env, tenant("bigint"), "operator")) as client:
        response = client.post("/api/v1/executions", content=body)
    assert_error(response, 400, "json_parse_error")


@pytest.mark.parametrize(
    "params", [{"since": FAR_TIME}, {"until": "9999-12-31T23:59:59-14:00"}]
)
def test_audit_search_time_out_of_range_is_400(server: Server, params) -> None:
    with server.client(make_key(server.env, tenant("far"), "admin")) as client:
        response = client.get("/api/admin/audit/search", params=params)
    assert_error(response, 400, "invalid_time")


# -- load ---------------------------------------------------------------------


def test_executions_beyond_the_slots_get_429_with_retry_after(server: Server) -> None:
    key = make_key(server.env, tenant("load"), "operator")
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        request = {"command": SLEEP, "argv": ["1"], "nonce": f"{uuid.uuid4()}-{i}"}
        with server.client(key) as client:
            response = client.post("/api/v1/executions", json=request)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted(r.status_code for r in answers)
    assert 201 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {201, 429}, statuses
    for response in answers:
        if response.status_code == 429:
            assert_error(response, 429, "execution_queue_full")
            assert response.headers["retry-after"] == "1"
    with server.client() as client:
        assert client.get("/api/health").status_code == 200


# -- PostgreSQL -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server(
    tmp_path_factory: pytest.TempPathFactory, postgres_server_url: str
) -> Iterator[Server]:
    import psycopg
    from psycopg import sql

    name = f"requiem_attack_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = postgres_server_url.rsplit("/", 1)[0]
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    home = tmp_path_factory.mktemp("attack-pg-home")
    running = start(home, DATABASE_URL=url)
    try:
        yield running
    finally:
        running.stop()
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s",
                (name,),
            )
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            )


def test_nul_in_execution_id_is_400_on_postgresql(pg_server: Server) -> None:
    """No id holds a NUL and PostgreSQL text cannot: refused before any query."""
    key = make_key(pg_server.env, tenant("nul"), "operator")
    with pg_server.client(key) as client:
        response = client.get("/api/v1/executions/ex_%00")
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        (
            "/api/v1/executions",
            {"cursor": base64.urlsafe_b64encode(b"2026-01-01T00:00:00|\0").decode()},
        ),
        ("/api/admin/audit/search", {"tenant": "\0"}),
        ("/api/admin/audit/search", {"action": "\0"}),
    ],
)
def test_nul_in_query_is_not_a_500_on_postgresql(
    pg_server: Server, path, params
) -> None:
    key = make_key(pg_server.env, tenant("nulq"), "admin")
    with pg_server.client(key) as client:
        response = client.get(path, params=params)
    assert response.status_code < 500, response.text


# -- faults found under load, shown at the smallest scale ------------------------


def test_concurrent_pins_of_one_object_all_succeed(tmp_path) -> None:
    from requiem import digest as dg
    from requiem.cas.store import LocalCAS

    cas = LocalCAS(tmp_path / "cas")
    cas.ensure()
    failures: list[BaseException] = []
    for round_ in range(10):
        digest = dg.of_bytes(f"pinned {round_}".encode())
        barrier = threading.Barrier(12)

        def pin(digest: str = digest, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                cas.pin(digest, "tenant:t_1")
            except Exception as exc:  # noqa: BLE001 - collected and asserted
                failures.append(exc)

        threads = [threading.Thread(target=pin) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_a_logged_exception_never_shows_the_api_key(capsys) -> None:
    from requiem import log

    secret = "rqm_" + "S3cr3t" * 7
    log.configure("info", "console")
    logger = log.get("requiem.test_attacks")

    def handle(headers: dict[bytes, bytes]) -> None:
        raise OverflowError("date value out of range")

    try:
        handle({b"authorization": f"Bearer {secret}".encode()})
    except OverflowError:
        logger.exception("request_failed", request_id="req_1")
    finally:
        log.configure()
    captured = capsys.readouterr()
    assert "request_failed" in captured.err
    assert secret not in captured.err
    assert secret[:20] not in captured.err
