"""`make demo`'s main job run as a test: real gcc, tar, gzip and pip through Requiem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLAIMS = [
    "gcc: C program embedding __DATE__/__TIME__: same result through Requiem from"
    " both callers",
    "gcc: C program embedding __DATE__/__TIME__: bare runs differ",
    "tar + gzip: a directory of files: same result through Requiem from both callers",
    "tar + gzip: a directory of files: bare runs differ",
    "pip wheel: a small Python project: same result through Requiem from both callers",
    "pip wheel: a small Python project: bare runs differ",
    "cas verify --all catches one flipped bit in a stored object",
    "replaying a command that reads /dev/urandom reports drift",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of ``python -m requiem.demo --json`` in a scratch directory."""
    where = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "requiem.demo", "--json"],
        cwd=where,
        capture_output=True,
        timeout=300,
        check=False,
    )
    body = json.loads(proc.stdout)
    body["exit_code"] = proc.returncode
    body["stderr"] = proc.stderr.decode()
    body["where"] = where
    return body


def test_every_claim_is_made_and_holds(demo: dict) -> None:
    held = {c["claim"]: c["held"] for c in demo["claims"]}

    assert list(held) == CLAIMS
    assert all(held.values()), [c for c in demo["claims"] if not c["held"]]
    assert demo["ok"] is True and demo["exit_code"] == 0


def test_state_lives_under_dot_requiem_demo(demo: dict) -> None:
    home = Path(demo["where"]) / ".requiem" / "demo"

    assert (home / "cas" / "v2" / "objects").is_dir()


def test_report_table_is_on_stderr_with_json(demo: dict) -> None:
    """With --json, stdout holds the claims only; the table goes to stderr."""
    assert "What the demo proved" in demo["stderr"]
    assert "not enforced on this machine: nothing" in demo["stderr"]


def test_bare_evidence_shows_two_different_digests(demo: dict) -> None:
    bare = [c for c in demo["claims"] if c["claim"].endswith("bare runs differ")]

    for claim in bare:
        left, right = claim["evidence"].split(" ", 1)[1].split(" vs ")
        assert left != right
