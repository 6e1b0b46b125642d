"""The drift corpus and `requiem verify drift|full`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine
from requiem.engine.drift import CorpusEntry, check, check_entry, load_corpus
from requiem.errors import ConfigError

SOURCES = {
    "clock",
    "timezone",
    "locale",
    "clock_seed",
    "hash_seed",
    "environment",
    "umask",
    "directory_order",
    "hostname",
}
# A caller whose every habit differs from the engine's fixed choices.
HOSTILE_CALLER = {
    "TZ": "Pacific/Kiritimati",
    "LANG": "C",
    "LC_ALL": "C",
    "PYTHONHASHSEED": "random",
    "SSH_AUTH_SOCK": "/tmp/agent.sock",
    "GITHUB_TOKEN": "caller-token",
}


def test_corpus_covers_every_source() -> None:
    assert {entry.name for entry in load_corpus()} == SOURCES


@pytest.mark.parametrize("entry", load_corpus(), ids=lambda e: e.name)
def test_recorded_digest_is_b3sum_of_the_expected_text(entry: CorpusEntry) -> None:
    """The pinned digest is what an outside tool computes from the written text."""
    b3sum = subprocess.run(
        ["b3sum", "--no-names"],
        input=entry.expected_stdout.encode(),
        capture_output=True,
        check=True,
    )

    assert b3sum.stdout.decode().strip() == entry.expected_stdout_digest


def test_unknown_request_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="no drift corpus request named nope"):
        load_corpus(["nope"])


def test_verify_drift_holds_from_a_hostile_caller(cli, home: Path) -> None:
    """Every request reproduces its recorded digest twice, whatever the caller set."""
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()

    result = cli(
        "verify", "drift", "--runs", "2", "--json", env=HOSTILE_CALLER, cwd=elsewhere
    )

    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["runs"] == 2
    assert {o["name"] for o in document["outcomes"] if o["ok"]} == SOURCES


def test_verify_drift_table(cli, home: Path) -> None:
    result = cli("verify:drift", "--runs", "1", "--only", "umask")

    assert result.code == 0, result.stderr
    assert "umask" in result.stdout and "ok" in result.stdout


def test_drift_without_bubblewrap_names_request_and_field(cli, home: Path) -> None:
    """With no working bubblewrap the host's name leaks: exit 5, drift_detected."""
    env = {"REQUIEM_BWRAP": str(home / "no-bwrap")}

    result = cli("verify", "drift", "--runs", "1", "--only", "hostname", env=env)

    assert result.code == 5
    last = result.stderr.splitlines()[-1]
    assert last.startswith(
        "requiem: error[drift_detected]: drift in hostname (stdout); first: hostname"
        " run 1: stdout expected 'requiem\\nrequiem\\n', got "
    )
    assert last.endswith(
        "(not enforced here: filesystem_isolation, fixed_hostname, no_network)"
    )


def test_drift_without_libfaketime_json(cli, home: Path) -> None:
    """The real clock leaks without libfaketime; --json carries every outcome."""
    env = {"REQUIEM_FAKETIME_LIB": str(home / "no-faketime.so")}

    result = cli("verify", "drift", "--runs", "1", "--only", "clock", "--json", env=env)

    assert result.code == 5
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "drift_detected"
    [outcome] = error["details"]["outcomes"]
    assert outcome["name"] == "clock" and outcome["ok"] is False
    assert outcome["differences"][0]["field"] == "stdout"


def test_runs_below_one_is_refused(home: Path) -> None:
    config = settings.load()
    engine = Engine(LocalCAS.from_settings(config), config)

    with pytest.raises(
        ConfigError, match=r"--runs must be at least 1 \(got 0\)"
    ) as exc:
        check(engine, runs=0)

    assert (exc.value.code, exc.value.exit_code) == ("config_error", 2)


def test_replays_of_a_random_command_are_each_reported(home: Path) -> None:
    """A command reading /dev/urandom differs from its record and on every replay."""
    config = settings.load()
    engine = Engine(LocalCAS.from_settings(config), config)
    entry = CorpusEntry(
        name="urandom",
        defeats="nothing: it reads the kernel's randomness",
        request={
            "command": "sh",
            "argv": ["-c", "head -c 8 /dev/urandom | od -An -tx1"],
        },
        expected_stdout="",
        expected_stdout_digest="af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    )
    workspace = home / "ws"
    workspace.mkdir()

    outcome = check_entry(engine, entry, 3, workspace)

    assert not outcome.ok
    assert [(d.run, d.field) for d in outcome.differences][0] == (1, "stdout")
    assert {d.run for d in outcome.differences} == {1, 2, 3}
    assert "stdout_digest" in {d.field for d in outcome.differences if d.run == 2}


def test_verify_full_passes_on_a_fresh_home(cli, home: Path) -> None:
    result = cli("verify", "full", "--json")

    assert result.code == 0, result.stderr
    names = [c["name"] for c in json.loads(result.stdout)["checks"]]
    assert names[-2:] == ["cas verify", "drift"]


def test_verify_full_fails_on_a_corrupt_cas_object(cli, home: Path) -> None:
    """One flipped bit in a stored object fails the whole verification (exit 5)."""
    cas = LocalCAS(home / "cas")
    key = cas.put_bytes(b"an object that will be damaged\n" * 100)
    blob = cas.blob_path(key)
    os.chmod(blob, 0o644)
    damaged = bytearray(blob.read_bytes())
    damaged[5] ^= 0x01
    blob.write_bytes(bytes(damaged))

    result = cli("verify", "full")

    assert result.code == 5
    assert "requiem: error[verification_failed]: verification failed: cas verify:" in (
        result.stderr
    )
