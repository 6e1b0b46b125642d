"""``requiem audit …`` without a server: flush, status, search, export, verify.

Most cases call the real entry point in this process (``main([...])``) to keep the
suite fast; one end-to-end case runs the installed command as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from requiem import log
from requiem import settings as settings_module
from requiem.cli.main import main
from requiem.control import audit
from requiem.control.audit_keys import AuditSigner
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory
from test_audit_chain import rehash_from

NO_SERVER = "http://127.0.0.1:9"  # discard port: nothing listens there


@pytest.fixture
def sessions(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REQUIEM_URL", NO_SERVER)
    engine = make_engine(settings_module.load())
    ensure_schema(engine)
    factory = session_factory(engine)
    with factory() as session, session.begin():
        session.execute(text("DELETE FROM audit_pending"))
    for n in range(6):
        audit.record(
            factory,
            "user.login" if n % 2 else "flag.set",
            actor=f"user_{n % 3}",
            tenant_id="t_a",
            details={"n": n},
        )
    yield factory
    engine.dispose()


def requiem(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the real entry point in-process → (exit code, stdout, stderr)."""
    try:
        with pytest.raises(SystemExit) as ended:
            main(list(args))
    finally:
        # main() may have raised the log level; put the library default back.
        log.configure()
    captured = capsys.readouterr()
    return ended.value.code, captured.out, captured.err


def test_flush_pending_status_act_on_the_database_without_a_server(sessions, capsys):
    before = requiem(capsys, "audit", "pending", "--json")
    flushed = requiem(capsys, "audit:flush")
    status = requiem(capsys, "audit", "status", "--json")

    assert before[0] == 0
    assert json.loads(before[1])["count"] == 6
    assert "acting on the database directly" in before[2]
    assert flushed[0] == 0
    assert flushed[1].startswith("flushed 6 entries; head 6 ")
    document = json.loads(status[1])
    assert (document["head_seq"], document["pending"]) == (6, 0)
    assert document["last_checkpoint"]["seq"] == 6


def test_verifying_an_empty_log_says_which_database_it_read(home, capsys):
    """An operator in the wrong directory must not mistake a new, empty log for ours."""
    code, out, err = requiem(capsys, "audit", "verify")

    assert code == 0
    assert out.startswith("audit chain intact: 0 entries")
    assert f"the audit log in sqlite:///{home / 'requiem.db'} holds no entries" in err


def test_search_by_user_since_a_human_duration(sessions, capsys):
    requiem(capsys, "audit", "flush")

    code, out, _ = requiem(
        capsys, "audit", "search", "--user", "user_1", "--since", "24h ago", "--json"
    )

    entries = json.loads(out)["entries"]
    assert code == 0
    assert [e["seq"] for e in entries] == [5, 2]
    assert {e["actor"] for e in entries} == {"user_1"}


@pytest.mark.parametrize("when", ["yesterday", "24 parsecs ago", "2026-13-01", ""])
def test_a_bad_time_is_invalid_time_exit_2(sessions, capsys, when):
    code, _, err = requiem(capsys, "audit", "search", "--since", when or " ")

    assert code == 2
    assert "error[invalid_time]" in err


def test_search_limit_below_one_is_a_usage_error(sessions, capsys):
    code, _, err = requiem(capsys, "audit", "search", "--limit", "0")

    assert code == 2
    assert "error[usage_error]" in err


def test_an_export_verifies_on_its_own(sessions, capsys, tmp_path: Path):
    requiem(capsys, "audit", "flush")
    code, out, _ = requiem(capsys, "audit", "export", "--since", "7 days ago")
    export = tmp_path / "evidence_audit.jsonl"
    export.write_text(out)
    key = tmp_path / "audit.pub"
    key.write_text(requiem(capsys, "audit", "public-key")[1])

    verified = requiem(
        capsys, "audit", "verify", "--file", str(export), "--public-key", str(key)
    )

    lines = out.splitlines()
    assert code == 0
    assert len(lines) == 7
    assert json.loads(lines[-1])["type"] == "checkpoint"
    assert json.loads(lines[0])["prev_hash"] == "0" * 64
    assert verified[0] == 0
    assert verified[1].startswith("audit chain intact: 6 entries up to seq 6")


def _export(capsys, sessions) -> list[str]:
    requiem(capsys, "audit", "flush")
    return requiem(capsys, "audit", "export")[1].splitlines(keepends=True)


def _verify_file(capsys, path: Path, lines: list[str]) -> tuple[str, int, dict]:
    path.write_text("".join(lines))
    code, out, _ = requiem(capsys, "audit", "verify", "--file", str(path), "--json")
    error = json.loads(out)["error"]
    return error["code"], code, error["details"]


def test_an_edited_export_is_caught(sessions, capsys, tmp_path: Path):
    lines = _export(capsys, sessions)
    lines[2] = lines[2].replace('"user_2"', '"user_9"')

    found = _verify_file(capsys, tmp_path / "x.jsonl", lines)

    assert found == ("audit_chain_broken", 4, {"seq": 3, "damage": "hash_mismatch"})


def test_an_export_missing_a_line_is_a_gap(sessions, capsys, tmp_path: Path):
    lines = _export(capsys, sessions)
    del lines[3]

    found = _verify_file(capsys, tmp_path / "x.jsonl", lines)

    assert found == ("audit_chain_broken", 4, {"seq": 4, "damage": "gap"})


def test_an_export_cut_short_is_truncated(sessions, capsys, tmp_path: Path):
    lines = _export(capsys, sessions)

    without_checkpoint = _verify_file(capsys, tmp_path / "a.jsonl", lines[:-1])
    half_line = _verify_file(capsys, tmp_path / "b.jsonl", lines[:3] + [lines[3][:40]])

    assert without_checkpoint[2] == {"seq": 7, "damage": "truncated"}
    assert half_line[2] == {"seq": 4, "damage": "truncated"}


def test_an_export_rewritten_and_resigned_with_another_key(
    sessions, capsys, tmp_path: Path
):
    """The forger's own key signs fine, but it is not the service's key."""
    lines = _export(capsys, sessions)
    checkpoint = json.loads(lines[-1])
    forger = AuditSigner(Ed25519PrivateKey.generate())
    forged = forger.sign(checkpoint["seq"], checkpoint["head_hash"], "2026-01-01")
    checkpoint.update(forged.to_dict(), public_key=forger.public_pem())
    lines[-1] = json.dumps(checkpoint) + "\n"

    found = _verify_file(capsys, tmp_path / "x.jsonl", lines)

    assert found[1:] == (4, {"seq": 6, "damage": "bad_signature"})


def test_a_saved_checkpoint_catches_a_full_rewrite(sessions, capsys, tmp_path: Path):
    """Edit entry 2, recompute every hash and drop the stored checkpoints: the
    checkpoint saved earlier still proves the rewrite."""
    saved = tmp_path / "checkpoint.json"
    requiem(capsys, "audit", "flush")
    assert requiem(capsys, "audit", "checkpoint", "--out", str(saved))[0] == 0
    with sessions() as session, session.begin():
        session.execute(text("DELETE FROM audit_checkpoints"))
        session.execute(text("UPDATE audit_entries SET actor = 'x' WHERE seq = 2"))
    rehash_from(sessions, 2)

    plain = requiem(capsys, "audit", "verify")
    code, out, err = requiem(
        capsys, "audit", "verify", "--against", str(saved), "--json"
    )
    status = requiem(capsys, "audit", "status", "--json")

    assert plain[0] == 0
    assert code == 4
    assert json.loads(out)["error"]["details"] == {
        "seq": 6,
        "damage": "checkpoint_mismatch",
    }
    assert "error[audit_chain_broken]: audit chain broken at seq 6" in err
    last = json.loads(status[1])["last_verification"]
    assert (last["ok"], last["first_bad_seq"], last["damage"]) == (
        False,
        6,
        "checkpoint_mismatch",
    )


def test_a_checkpoint_file_with_a_changed_hash_is_bad_signature(
    sessions, capsys, tmp_path: Path
):
    saved = tmp_path / "checkpoint.json"
    requiem(capsys, "audit", "flush")
    requiem(capsys, "audit", "checkpoint", "--out", str(saved))
    document = json.loads(saved.read_text())
    document["head_hash"] = "f" * 64
    saved.write_text(json.dumps(document))

    code, _, err = requiem(capsys, "audit", "verify", "--against", str(saved))

    assert code == 4
    assert "audit chain broken at seq 6" in err
    assert "signature" in err


@pytest.mark.parametrize(
    ("content", "code", "exit_code"),
    [
        (None, "file_not_found", 3),
        ("not json", "audit_checkpoint_invalid", 2),
        ('{"seq": 1}', "audit_checkpoint_invalid", 2),
    ],
)
def test_a_bad_checkpoint_file_is_refused(
    sessions, capsys, tmp_path: Path, content, code, exit_code
):
    path = tmp_path / "checkpoint.json"
    if content is not None:
        path.write_text(content)

    ended, _, err = requiem(capsys, "audit", "verify", "--against", str(path))

    assert ended == exit_code
    assert f"error[{code}]" in err


@pytest.mark.parametrize(
    ("option", "content", "code", "exit_code"),
    [
        ("--public-key", None, "file_not_found", 3),
        ("--public-key", "not a key", "audit_public_key_invalid", 2),
        ("--file", None, "file_not_found", 3),
    ],
)
def test_bad_files_for_verify_are_refused(
    sessions, capsys, tmp_path: Path, option, content, code, exit_code
):
    path = tmp_path / "given"
    if content is not None:
        path.write_text(content)
    args = [option, str(path)]
    if option == "--public-key":
        args += ["--file", str(tmp_path / "given")]

    ended, _, err = requiem(capsys, "audit", "verify", *args)

    assert ended == exit_code
    assert f"error[{code}]" in err


def test_the_public_key_is_pem_and_the_key_file_private(sessions, capsys):
    code, out, _ = requiem(capsys, "audit", "public-key")

    key_file = settings_module.load().audit_key_file
    assert code == 0
    assert out.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700


def test_verify_end_to_end_as_a_subprocess(sessions, cli):
    """The installed command: a damaged chain ends with exit 4 and one line."""
    with sessions() as session, session.begin():
        audit.record(session, "flag.set")
    assert cli("audit", "flush").code == 0
    with sessions() as session, session.begin():
        session.execute(text("UPDATE audit_entries SET outcome = 'x' WHERE seq = 3"))

    result = cli("audit:verify")

    assert result.code == 4
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "requiem: error[audit_chain_broken]: audit chain broken at seq 3: "
        "the entry's content was changed"
    )
