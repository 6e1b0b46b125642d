"""`requiem env verify`: every setting checked, secrets never shown."""

from __future__ import annotations

import json

import test_store_cli

run_here = test_store_cli.run  # the in-process `requiem` fixture, shared


def _report(result) -> dict:
    return json.loads(result.stdout)


def test_defaults_verify_clean_with_a_reachable_database(
    run_here, database_url
) -> None:
    """Defaults plus a reachable database: exit 0; no server is only a warning."""
    result = run_here(
        "env",
        "verify",
        "--json",
        env={"DATABASE_URL": database_url, "REQUIEM_URL": "http://127.0.0.1:9"},
    )

    report = _report(result)
    by_name = {row["name"]: row for row in report["settings"]}
    assert result.code == 0, result.stderr
    assert report["ok"] is True
    assert by_name["DATABASE_URL"]["status"] == "ok"
    assert by_name["REQUIEM_URL"]["status"] == "warning"
    assert by_name["REQUIEM_PORT"]["source"] == "default"


def test_secrets_are_never_printed(run_here, postgres_server_url) -> None:
    """Secret values show as set; a database password is masked."""
    host = postgres_server_url.split("@", 1)[1]
    env = {
        "DATABASE_URL": f"postgresql://postgres:pw-7f3a9c@{host}",
        "REQUIEM_SECRET_KEY": "sk-7f3a9c-server-secret",
        "REQUIEM_API_KEY": "rq-7f3a9c-client-key",
    }

    as_json = run_here("env", "verify", "--json", env=env)
    as_text = run_here("env", "verify", env=env)

    for result in (as_json, as_text):
        assert "7f3a9c" not in result.stdout + result.stderr
    by_name = {row["name"]: row for row in _report(as_json)["settings"]}
    assert by_name["REQUIEM_SECRET_KEY"]["value"] == "set"
    assert by_name["DATABASE_URL"]["value"].startswith("postgresql://postgres:***@")


def test_malformed_and_out_of_range_settings_fail(run_here) -> None:
    """A non-number and a port out of range: env_invalid, exit 2, both named."""
    result = run_here(
        "env",
        "verify",
        "--json",
        env={"REQUIEM_DB_POOL_SIZE": "many", "REQUIEM_PORT": "70000"},
    )

    report = _report(result)
    assert result.code == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("requiem: error[env_invalid]:")
    )
    assert report["ok"] is False
    assert any(e.startswith("REQUIEM_DB_POOL_SIZE:") for e in report["errors"])
    assert any(e.startswith("REQUIEM_PORT:") for e in report["errors"])


def test_unreachable_database_fails(run_here) -> None:
    """The database is reached for real: nothing on port 1 means exit 2."""
    result = run_here(
        "env",
        "verify",
        "--json",
        env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"},
    )

    assert result.code == 2
    assert any("database unreachable" in e for e in _report(result)["errors"])


def test_unknown_requiem_variables_warn(run_here) -> None:
    """A typo such as REQUIEM_PROT is a warning, not a failure."""
    result = run_here(
        "env",
        "verify",
        "--json",
        env={"REQUIEM_PROT": "8081", "REQUIEM_TEST_ANYTHING": "1"},
    )

    warnings = _report(result)["warnings"]
    assert result.code == 0
    assert "unknown variable REQUIEM_PROT (a typo?)" in warnings
    assert not any("REQUIEM_TEST_ANYTHING" in w for w in warnings)


def test_production_profile_rules_are_checked(run_here) -> None:
    """Production on SQLite without the opt-in is an error."""
    result = run_here("env", "verify", "--json", env={"REQUIEM_ENV": "production"})

    assert result.code == 2
    assert any("refuses SQLite" in e for e in _report(result)["errors"])
