"""Shared fixtures: an isolated REQUIEM_HOME per test and the public vectors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(
    os.environ.get("REQUIEM_TEST_VECTORS", ROOT.parent / "shared" / "vectors")
)


@pytest.fixture
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"public test vectors not found at {VECTORS}")
    return VECTORS


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private REQUIEM_HOME; the caller's REQUIEM_* and DATABASE_URL removed."""
    for name in list(os.environ):
        if (name.startswith("REQUIEM_") and not name.startswith("REQUIEM_TEST_")) or (
            name == "DATABASE_URL"
        ):
            monkeypatch.delenv(name)
    state = tmp_path / "home"
    state.mkdir()
    monkeypatch.setenv("REQUIEM_HOME", str(state))
    return state


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120,
) -> CliResult:
    """Run ``python -m requiem ARGS`` as a real subprocess and capture its streams."""
    proc = subprocess.run(
        [sys.executable, "-m", "requiem", *args],
        input=input,
        capture_output=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
def cli(home: Path):
    """``cli("cas", "stats")`` runs the real command against the test's REQUIEM_HOME."""
    return run_cli


DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """A reachable PostgreSQL server; skipped (failed in CI) when there is none."""
    url = os.environ.get("REQUIEM_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    if _reachable(url):
        return url
    reason = f"PostgreSQL not reachable at {url} (set REQUIEM_TEST_POSTGRES_URL)"
    if os.environ.get("REQUIEM_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test alone, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"requiem_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = postgres_server_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, home: Path) -> str:
    """Each test using this runs twice: on a private SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{home / 'requiem.db'}"
    return request.getfixturevalue("postgres_url")
