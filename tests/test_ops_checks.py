"""`requiem doctor`, `health`, `health dependencies`, `version`, run as users do."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

from requiem import digest
from requiem.cli import ops_cmd

UNREACHABLE_PG = "postgresql://requiem:hunter2@127.0.0.1:1/requiem"


def _checks(document: dict) -> dict[str, dict]:
    return {c["name"]: c for c in document["checks"]}


def test_embedded_blake3_vectors_are_the_official_ones(vectors: Path) -> None:
    """Every vector doctor embeds equals the BLAKE3 team's value for that length."""
    official = json.loads((vectors / "blake3" / "test_vectors.json").read_text())
    by_length = {case["input_len"]: case["hash"][:64] for case in official["cases"]}

    for length, expected in ops_cmd.BLAKE3_VECTORS.items():
        assert by_length[length] == expected


def test_doctor_cas_probe_agrees_with_b3sum(home: Path) -> None:
    """The probe object doctor writes is keyed by the same digest b3sum prints."""
    b3sum = subprocess.run(
        ["b3sum", "--no-names"], input=ops_cmd.CAS_PROBE, capture_output=True
    )

    assert digest.of_bytes(ops_cmd.CAS_PROBE) == b3sum.stdout.decode().strip()


def test_doctor_passes_on_a_fresh_home(cli, home: Path) -> None:
    """Every check runs; a working machine has no blocker and exits 0."""
    result = cli("doctor", "--json")

    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    checks = _checks(document)
    assert set(checks) == {
        "hash",
        "cas",
        "bubblewrap",
        "libfaketime",
        "rlimits",
        "python",
        "database",
    }
    assert document["ok"] is True and document["blockers"] == []
    assert checks["hash"]["status"] == "ok"
    assert checks["cas"]["detail"] == f"{home / 'cas'}: writable and readable"
    assert checks["bubblewrap"]["status"] == "ok"
    assert checks["libfaketime"]["status"] == "ok"


def test_doctor_blocks_on_unwritable_cas(cli, home: Path) -> None:
    """A CAS root that is a plain file is a blocker: exit 2, doctor_blocked."""
    not_a_dir = home / "cas-file"
    not_a_dir.write_text("x")

    result = cli("doctor", "--json", env={"REQUIEM_CAS_DIR": str(not_a_dir)})

    assert result.code == 2
    assert (
        "requiem: error[doctor_blocked]: doctor found blockers: cas:" in result.stderr
    )
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "doctor_blocked"
    assert error["details"]["blockers"] == ["cas"]


def test_doctor_blocks_on_unreachable_database_without_leaking_it(
    cli, home: Path
) -> None:
    """A configured database that does not answer blocks; its password never shows."""
    result = cli("doctor", env={"DATABASE_URL": UNREACHABLE_PG})

    assert result.code == 2
    assert "error[doctor_blocked]" in result.stderr
    assert "database: unreachable (OperationalError)" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_doctor_pings_a_configured_postgres(cli, home: Path, postgres_url: str) -> None:
    result = cli("doctor", "--json", env={"DATABASE_URL": postgres_url})

    assert result.code == 0, result.stderr
    database = _checks(json.loads(result.stdout))["database"]
    assert database == {
        "name": "database",
        "status": "ok",
        "detail": "postgresql at 127.0.0.1: reachable",
    }


def test_doctor_warns_without_bubblewrap_and_libfaketime(cli, home: Path) -> None:
    """Missing sandbox tools are warnings naming the Debian package; exit stays 0."""
    missing = str(home / "missing")
    env = {"REQUIEM_BWRAP": missing, "REQUIEM_FAKETIME_LIB": missing}

    result = cli("doctor", "--json", env=env)

    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    checks = _checks(document)
    assert document["warnings"] == ["bubblewrap", "libfaketime"]
    assert "Debian package 'bubblewrap'" in checks["bubblewrap"]["detail"]
    assert "Debian package 'libfaketime'" in checks["libfaketime"]["detail"]


def test_health_is_ok_on_a_fresh_home(cli, home: Path) -> None:
    result = cli("health", "--json")

    assert result.code == 0, result.stderr
    assert [c["name"] for c in json.loads(result.stdout)["checks"]] == ["spawn", "cas"]


def test_health_reports_unhealthy_cas(cli, home: Path) -> None:
    """A CAS it cannot write makes the engine unhealthy: exit 6, code unhealthy."""
    not_a_dir = home / "cas-file"
    not_a_dir.write_text("x")

    result = cli("health", "--json", env={"REQUIEM_CAS_DIR": str(not_a_dir)})

    assert result.code == 6
    assert result.stderr.startswith(
        "requiem: error[unhealthy]: unhealthy: spawn: the engine cannot run true: "
    )
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unhealthy"
    assert error["details"]["blockers"] == ["spawn", "cas"]


def test_health_dependencies_on_embedded_defaults(cli, home: Path) -> None:
    """No server configured: database (SQLite), CAS and sandbox tools are checked."""
    result = cli("health", "dependencies", "--json")

    assert result.code == 0, result.stderr
    checks = _checks(json.loads(result.stdout))
    assert set(checks) == {"database", "cas", "bubblewrap", "libfaketime", "rlimits"}
    assert checks["database"]["detail"] == f"sqlite at {home / 'requiem.db'}: reachable"


def test_health_dependencies_names_an_unreachable_server(cli, home: Path) -> None:
    result = cli("health:dependencies", env={"REQUIEM_URL": "http://127.0.0.1:1"})

    assert result.code == 6
    assert "error[unhealthy]: a dependency is unhealthy: server: " in result.stderr
    assert "no Requiem server reachable at http://127.0.0.1:1" in result.stderr


def test_health_dependencies_names_an_unreachable_database(cli, home: Path) -> None:
    result = cli("health", "dependencies", env={"DATABASE_URL": UNREACHABLE_PG})

    assert result.code == 6
    assert "database: unreachable" in result.stderr
    assert "hunter2" not in result.stderr


def test_version_names_product_python_libraries_and_tools(cli, home: Path) -> None:
    result = cli("version", "--json")

    assert result.code == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["requiem"] == metadata.version("requiem")
    assert found["libraries"]["blake3"] == metadata.version("blake3")
    assert found["libraries"]["sqlalchemy"] == metadata.version("sqlalchemy")
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True)
    assert bwrap.stdout.split() == [
        "bubblewrap",
        found["sandbox"]["bubblewrap"]["version"],
    ]
    assert found["sandbox"]["libfaketime"]["path"].endswith("libfaketime.so.1")


def test_version_table_is_readable(cli, home: Path) -> None:
    """One ``name  value`` row per item, the product first."""
    result = cli("version")

    assert result.code == 0
    rows = [line.replace("│", " ").split() for line in result.stdout.splitlines()]
    assert ["requiem", metadata.version("requiem")] in rows


def test_health_dependencies_reaches_a_running_server(tmp_path: Path) -> None:
    """With REQUIEM_URL set, the real server's /api/health is one of the checks."""
    from live_server import cli as live_cli
    from live_server import start

    server = start(tmp_path)
    try:
        env = {**server.env, "REQUIEM_URL": server.url}
        result = live_cli(env, "health", "dependencies", "--json")
    finally:
        assert server.stop() == 0, server.log()

    assert result.returncode == 0, result.stderr
    checks = _checks(json.loads(result.stdout))
    assert checks["server"] == {
        "name": "server",
        "status": "ok",
        "detail": f"{server.url}: ok",
    }
