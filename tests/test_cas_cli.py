"""``requiem cas …`` through the real command: output, errors and exit codes.

Error codes, exit codes and the terminal check run the command as a subprocess
(``cli``); the longer happy paths call the same entry point in this process
(``requiem``), which skips a second of interpreter start-up per call.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from requiem.cas.store import LocalCAS
from requiem.cli.main import main

TEXT = b"line of text\n" * 2000


@pytest.fixture
def cas(home: Path) -> LocalCAS:
    return LocalCAS(home / "cas")


@dataclass
class Ran:
    code: int
    stdout: bytes
    stderr: str


@pytest.fixture
def requiem(home: Path, capfdbinary: pytest.CaptureFixture[bytes]):
    """``requiem("cas", "stats")`` runs the real entry point in this process."""

    def run(*args: str) -> Ran:
        capfdbinary.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capfdbinary.readouterr()
        return Ran(code, captured.out, captured.err.decode())

    return run


def _error_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_put_prints_the_b3sum_digest_and_get_returns_the_bytes(
    requiem, cli, tmp_path: Path
) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(TEXT)
    b3sum = subprocess.run(["b3sum", "--no-names", str(source)], capture_output=True)

    put = requiem("cas", "put", str(source))
    from_stdin = cli("cas", "put", "-", input=TEXT)
    digest = put.stdout.decode().strip()
    to_stdout = requiem("cas", "get", digest)
    to_file = requiem("cas", "get", digest, "-o", str(tmp_path / "out.txt"))

    assert put.code == from_stdin.code == to_stdout.code == to_file.code == 0
    assert put.stdout.decode() == from_stdin.stdout == b3sum.stdout.decode()
    assert to_stdout.stdout == TEXT
    assert (tmp_path / "out.txt").read_bytes() == TEXT


def test_put_of_a_missing_file(cli, tmp_path: Path) -> None:
    result = cli("cas", "put", str(tmp_path / "nope"))

    assert result.code == 3
    assert result.stdout == ""
    assert _error_line(result.stderr).startswith("requiem: error[file_not_found]:")


@pytest.mark.parametrize(
    ("digest", "code", "exit_code"),
    [
        ("not-a-digest", "invalid_digest", 2),
        ("F" * 64, "invalid_digest", 2),
        ("0" * 64, "cas_object_not_found", 3),
    ],
)
def test_get_of_a_bad_or_unknown_digest(
    requiem, digest: str, code: str, exit_code: int
) -> None:
    result = requiem("cas", "get", digest)

    assert result.code == exit_code
    assert result.stdout == b""
    assert _error_line(result.stderr).startswith(f"requiem: error[{code}]:")


def test_errors_through_the_installed_command(cli) -> None:
    """The same codes and exits from a real process, stdout left empty."""
    bad = cli("cas", "get", "not-a-digest")
    unknown = cli("cas", "get", "0" * 64)

    assert (bad.code, unknown.code) == (2, 3)
    assert bad.stdout == unknown.stdout == ""
    assert _error_line(bad.stderr).startswith("requiem: error[invalid_digest]:")
    assert _error_line(unknown.stderr).startswith(
        "requiem: error[cas_object_not_found]:"
    )


def test_get_of_a_corrupt_object_emits_nothing(
    cli, requiem, cas: LocalCAS, tmp_path: Path
) -> None:
    digest = cas.put_bytes(os.urandom(3 << 20))
    blob = cas.blob_path(digest)
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 0x01
    blob.write_bytes(bytes(damaged))

    to_stdout = cli("cas", "get", digest)
    to_file = requiem("cas", "get", digest, "-o", str(tmp_path / "out"))

    assert (to_stdout.code, to_file.code) == (4, 4)
    assert to_stdout.stdout == ""
    assert not (tmp_path / "out").exists()
    assert "error[cas_integrity_failed]" in _error_line(to_stdout.stderr)


def test_stats(requiem, cas: LocalCAS) -> None:
    cas.put_bytes(TEXT)
    cas.put_bytes(os.urandom(1000))

    result = requiem("cas", "stats", "--json")
    report = json.loads(result.stdout)

    assert result.code == 0
    assert report["objects"] == 2
    assert report["logical_bytes"] == len(TEXT) + 1000
    assert report["by_encoding"]["identity"] == {
        "objects": 1,
        "logical_bytes": 1000,
        "stored_bytes": 1000,
    }
    zstd = report["by_encoding"]["zstd"]
    assert report["stored_bytes"] == 1000 + zstd["stored_bytes"]
    assert report["compression_ratio"] == round(
        report["logical_bytes"] / report["stored_bytes"], 3
    )


def test_verify_sample_on_an_empty_store(requiem) -> None:
    result = requiem("cas", "verify", "--sample", "100")

    assert result.code == 0
    assert "0 of 0 objects checked" in result.stderr


def test_verify_sample_larger_than_the_store_checks_everything(
    requiem, cas: LocalCAS
) -> None:
    for n in range(5):
        cas.put_bytes(b"object %d" % n)

    result = requiem("cas", "verify", "--sample", "100", "--json")
    report = json.loads(result.stdout)

    assert result.code == 0
    assert (report["ok"], report["mode"], report["checked"], report["good"]) == (
        True,
        "sample",
        5,
        5,
    )


def _damage_every_way(cas: LocalCAS) -> dict[str, str]:
    """One object (or temp file) per reason verify knows."""
    reasons = (
        "missing_blob",
        "missing_metadata",
        "metadata_unreadable",
        "stored_hash_mismatch",
        "content_digest_mismatch",
    )  # the exact strings operators' scripts match on
    made = {reason: cas.put_bytes(reason.encode() * 100) for reason in reasons}
    cas.blob_path(made["missing_blob"]).unlink()
    cas.meta_path(made["missing_metadata"]).unlink()
    cas.meta_path(made["metadata_unreadable"]).write_text("[]")
    blob = cas.blob_path(made["stored_hash_mismatch"])
    blob.write_bytes(blob.read_bytes()[:-1])
    forged = b"forged"
    cas.blob_path(made["content_digest_mismatch"]).write_bytes(forged)
    meta_path = cas.meta_path(made["content_digest_mismatch"])
    meta = json.loads(meta_path.read_bytes())
    meta.update(
        encoding="identity",
        stored_size=len(forged),
        stored_blake3=__import__("blake3").blake3(forged).hexdigest(),
    )
    meta_path.write_text(json.dumps(meta))
    orphan = cas.tmp / "put-99-1.tmp"
    orphan.write_bytes(b"half written")
    long_ago = time.time() - 3600
    os.utime(orphan, (long_ago, long_ago))
    made["orphan_temp_file"] = str(orphan)
    return made


def test_verify_all_reports_every_bad_object_with_its_reason(
    cli, cas: LocalCAS
) -> None:
    good = cas.put_bytes(b"fine")
    made = _damage_every_way(cas)

    result = cli("cas", "verify", "--all", "--json")
    report = json.loads(result.stdout)
    found = {
        bad["reason"]: bad.get("digest") or bad.get("path") for bad in report["bad"]
    }

    assert result.code == 4
    assert _error_line(result.stderr).startswith(
        "requiem: error[cas_integrity_failed]: 6 problems"
    )
    assert found == made
    assert (report["ok"], report["checked"], report["good"]) == (False, 6, 1)
    assert good not in found.values()


def test_verify_needs_exactly_one_mode(cli, requiem) -> None:
    neither = cli("cas", "verify")
    both = requiem("cas", "verify", "--all", "--sample", "3")

    assert (neither.code, both.code) == (2, 2)
    assert _error_line(neither.stderr).startswith("requiem: error[usage_error]:")
    assert _error_line(both.stderr).startswith("requiem: error[usage_error]:")


def test_verify_shows_progress_only_on_a_terminal(cas: LocalCAS, home: Path) -> None:
    """With stderr on a terminal a bar is drawn there; stdout stays the report."""
    for n in range(3):
        cas.put_bytes(b"object %d" % n)
    leader, follower = pty.openpty()

    proc = subprocess.run(
        [sys.executable, "-m", "requiem", "cas", "verify", "--all", "--json"],
        stdout=subprocess.PIPE,
        stderr=follower,
        check=False,
        timeout=60,
    )
    os.close(follower)
    drawn = os.read(leader, 65536).decode(errors="replace")
    os.close(leader)

    assert proc.returncode == 0
    assert json.loads(proc.stdout)["checked"] == 3
    assert "verifying" in drawn


def test_export_is_one_json_document_of_every_object(requiem, cas: LocalCAS) -> None:
    digests = sorted(cas.put_bytes(b"object %d" % n) for n in range(4))
    cas.meta_path(digests[0]).unlink()

    result = requiem("cas", "export", "--all")
    manifest = json.loads(result.stdout)

    assert result.code == 0
    assert manifest["format"] == "requiem.cas.export/1"
    assert [entry["digest"] for entry in manifest["objects"]] == digests
    assert manifest["objects"][0] == {
        "digest": digests[0],
        "problem": "missing_metadata",
    }
    assert manifest["objects"][1]["size"] == len(b"object 0")
    assert (manifest["count"], manifest["problems"]) == (4, 1)


def test_export_needs_all(requiem) -> None:
    result = requiem("cas", "export")

    assert result.code == 2
    assert "error[usage_error]" in result.stderr


def test_gc_removes_unreferenced_objects_and_audits_it(
    requiem, cas: LocalCAS, home: Path
) -> None:
    kept = cas.put_bytes(b"stdout of a stored result")
    result_blob = cas.put_bytes(json.dumps({"stdout_digest": kept}).encode())
    entry = cas.action_cache / "ab" / ("ab" * 32)
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"result_blob": result_blob}))
    garbage = cas.put_bytes(b"nobody wants this")

    dry = requiem("cas", "gc", "--dry-run", "--grace", "0s", "--json")
    after_dry = sorted(cas.iter_digests())
    real = requiem("cas", "gc", "--grace", "0s", "--json")
    with sqlite3.connect(home / "requiem.db") as db:
        entries = [
            json.loads(row[0]) for row in db.execute("SELECT entry FROM audit_pending")
        ]

    assert (dry.code, real.code) == (0, 0)
    assert json.loads(dry.stdout)["removed"] == 1
    assert after_dry == sorted([kept, result_blob, garbage])
    assert json.loads(real.stdout)["removed"] == 1
    assert sorted(cas.iter_digests()) == sorted([kept, result_blob])
    audited = [e for e in entries if e["action"] == "cas.gc"]
    assert [json.loads(e["details_json"])["removed"] for e in audited] == [1]


def test_gc_default_grace_keeps_fresh_objects(requiem, cas: LocalCAS) -> None:
    digest = cas.put_bytes(b"just written")

    result = requiem("cas", "gc", "--json")

    assert json.loads(result.stdout)["young"] == 1
    assert cas.exists(digest)


def test_gc_refuses_a_bad_grace(cli) -> None:
    result = cli("cas", "gc", "--grace", "soon")

    assert result.code == 2
    assert _error_line(result.stderr).startswith("requiem: error[invalid_duration]:")


def test_put_of_a_directory_and_get_into_a_missing_directory(
    requiem, cas: LocalCAS, tmp_path: Path
) -> None:
    digest = cas.put_bytes(b"kept")

    put = requiem("cas", "put", str(tmp_path))
    get = requiem("cas", "get", digest, "-o", str(tmp_path / "no" / "such" / "file"))

    assert (put.code, get.code) == (2, 3)
    assert _error_line(put.stderr).startswith("requiem: error[usage_error]:")
    assert _error_line(get.stderr).startswith("requiem: error[file_not_found]:")
