"""Attacks on the engine and its commands: each test is a bug found, or a guard kept.

Every test runs the real thing: the ``requiem`` command in a subprocess, or the
engine in-process against a real CAS, bubblewrap, libfaketime and prlimit. The
one fake is a CAS whose disk is full, standing in for a machine we may not fill.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from requiem import digest as dg
from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest, policy, workspace
from requiem.engine import cache as action_cache
from requiem.errors import RequiemError

SECRETS = {
    "GITHUB_TOKEN": "ghp_callerSecret1",
    "MY_API_KEY": "callerSecret2",
    "DATABASE_URL": "postgresql://u:callerSecret3@h/db",
    "AWS_SECRET_ACCESS_KEY": "callerSecret4",
    "github_token": "callerSecret5",
    "my_api_key": "callerSecret6",
}


def make_engine(cas_class: type[LocalCAS] = LocalCAS) -> Engine:
    config = settings.load(dict(os.environ))
    cas = cas_class(
        config.cas_dir,
        compression=str(config.get("REQUIEM_CAS_COMPRESSION")),
        zstd_level=config.int("REQUIEM_CAS_ZSTD_LEVEL"),
    )
    return Engine(cas, config)


def shell(script: str, **fields) -> ExecutionRequest:
    return ExecutionRequest.from_mapping(
        {"command": "sh", "argv": ["-c", script], **fields}
    )


def one_error_line(stderr: str, code: str) -> None:
    """The command said exactly one ``requiem: error[code]`` line and no traceback."""
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if line.startswith("requiem: error")]
    assert len(said) == 1, stderr
    assert said[0].startswith(f"requiem: error[{code}]: "), stderr


# -- the caller's environment ------------------------------------------------------


def test_caller_secrets_reach_neither_child_nor_output(cli, tmp_path: Path):
    passed = [f"--env={name}={value}" for name, value in SECRETS.items()]
    done = cli(
        "run", *passed, "--json", "--", "sh", "-c", "env; echo done",
        env=SECRETS, cwd=tmp_path,
    )  # fmt: skip

    assert done.code == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stdout"].endswith("done\n")
    for value in SECRETS.values():
        assert value not in done.stdout
        assert value not in done.stderr
    assert sorted(result["policy_applied"]["env_secret_stripped"]) == sorted(SECRETS)


@pytest.mark.parametrize(
    "name",
    ["DB_PASS", "MYSQL_PWD", "PGPASSFILE", "GH_PAT", "SLACK_WEBHOOK_URL", "CI_JOB_JWT",
     "GPG_PASSPHRASE", "API_KEY_ID", "SSH_PRIVATE_KEY_PEM", "REDIS_URL",
     "POSTGRES_URL", "mongodb_uri"],
)  # fmt: skip
def test_common_credential_names_are_stripped(name: str):
    request = shell("env", env={name: "credential-value"})

    assert policy.filter_env(request).secret == [name]


def test_malformed_env_option_does_not_echo_its_text(cli, tmp_path: Path):
    done = cli("run", "--env", "A=1", "--env", "ghp_pastedTokenValue", "--", "true")

    assert done.code == 2
    one_error_line(done.stderr, "usage_error")
    assert "ghp_pastedTokenValue" not in done.stderr + done.stdout


def test_result_digest_ignores_caller_tz_locale_umask_and_cwd(cli, tmp_path: Path):
    script = "date; ls -l; umask; pwd; hostname; echo $TZ $LANG; cat a.txt"
    digests = []
    for n, (tz, lang, mask) in enumerate(
        [("UTC", "C.UTF-8", 0o022), ("Asia/Tokyo", "de_DE.UTF-8", 0o077)]
    ):
        place = tmp_path / f"caller{n}" / ("deeper/" * n)
        place.mkdir(parents=True)
        (place / "a.txt").write_text("same\n")
        os.chmod(place / "a.txt", 0o600 if n else 0o644)
        env = {"TZ": tz, "LANG": lang, "LC_ALL": lang, "HOSTNAME": f"host{n}"}
        old = os.umask(mask)
        try:
            done = cli(
                "run", "--no-cache", "--json", "--", "sh", "-c", script,
                env=env, cwd=place,
            )  # fmt: skip
        finally:
            os.umask(old)
        assert done.code == 0, done.stderr
        digests.append(json.loads(done.stdout)["result_digest"])

    assert digests[0] == digests[1]


# -- paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("ln -s /etc/passwd out", "path_escape"),
        ("ln -s ../../../../../../../etc/passwd out", "path_escape"),
        ("ln -s /dev/zero out", "path_escape"),
        ("mkfifo out", "missing_output"),
        ("mkdir out", "missing_output"),
    ],
)
def test_output_that_is_not_a_workspace_file_is_never_captured(
    home: Path, tmp_path: Path, script: str, code: str
):
    result = make_engine().run(shell(script, outputs=["out"]))

    assert (result.ok, result.error_code) == (False, code)
    assert result.output_digests == {}


def test_output_under_a_symlinked_directory_to_the_host_is_path_escape(home: Path):
    result = make_engine().run(shell("ln -s /etc d", outputs=["d/passwd"]))

    assert result.error_code == "path_escape"
    assert result.output_digests == {}


def test_caller_output_symlinked_out_of_the_workspace_is_refused(cli, tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "out.txt").symlink_to(victim)

    done = cli(
        "run", "--output", "out.txt", "--", "sh", "-c", "echo pwned > out.txt",
        cwd=work,
    )  # fmt: skip

    assert done.code == 2
    one_error_line(done.stderr, "path_escape")
    assert victim.read_text() == "untouched\n"


@pytest.mark.parametrize("where", ["home", "cas", "work"])
def test_workspace_inside_requiem_state_is_refused(cli, home: Path, where: str):
    place = {"home": home, "cas": home / "cas" / "v2", "work": home / "work"}[where]
    # A project folder elsewhere under REQUIEM_HOME (the demo's checkouts) is fine.
    place.mkdir(parents=True, exist_ok=True, mode=0o700)
    (home / "requiem.db").write_text("not for the child\n")

    done = cli(
        "run", "--", "cat", "requiem.db",
        cwd=place, env={"REQUIEM_WORK_DIR": str(home / "work")},
    )  # fmt: skip

    assert done.code == 2
    one_error_line(done.stderr, "invalid_request")
    assert "not for the child" not in done.stdout


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_file_swapped_for_something_else_is_not_read(
    home: Path, tmp_path: Path, kind: str
):
    path = tmp_path / "swapped"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to("/etc/hostname")
    else:
        path.mkdir()

    assert workspace.put_regular_file(make_engine().cas, path) is None


def test_non_utf8_file_name_in_the_workspace_is_invalid_request(cli, tmp_path: Path):
    os.mkdir(tmp_path / "w")
    with open(os.path.join(os.fsencode(tmp_path / "w"), b"bad\xffname"), "wb"):
        pass

    done = cli("run", "--", "true", cwd=tmp_path / "w")

    assert done.code == 2
    one_error_line(done.stderr, "invalid_request")
    assert "not valid UTF-8" in done.stderr


def test_scratch_directory_inside_the_workspace_is_not_snapshotted(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    (work / "left-by-another-run").write_text("junk\n")
    (tmp_path / "mine.txt").write_text("mine\n")
    monkeypatch.setenv("REQUIEM_WORK_DIR", str(work))

    result = make_engine().run(shell("true", workspace_root=str(tmp_path)))

    assert list(result.request["inputs"]) == ["mine.txt"]


# -- bad input to the commands -----------------------------------------------------


BAD_REQUESTS = [
    ('{"command": "true", "env": {"\\udfff": "x"}}', "json_parse_error"),
    ('{"command": "true", "env": {"A": "\\udfff"}}', "json_parse_error"),
    ('{"command": "true", "workspace_root": "\\ud800"}', "json_parse_error"),
    ('{"command": "true", "argv": ["\\ud800"]}', "json_parse_error"),
    ('{"command": "true", "\\ud800": 1}', "json_parse_error"),
    ('{"command": "true", "command": "false"}', "json_duplicate_key"),
    ('{"command": "true", "timeout_ms": NaN}', "json_parse_error"),
    ('{"command": "true", "timeout_ms": -1}', "invalid_request"),
    ('{"command": "true", "timeout_ms": 1e400}', "invalid_request"),
    ('{"env": ' + "[" * 50_000 + "]" * 50_000 + "}", "json_parse_error"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "code"), BAD_REQUESTS)
def test_bad_request_gets_its_code(raw: str, code: str):
    with pytest.raises(RequiemError) as raised:
        ExecutionRequest.parse(raw.encode())

    assert (raised.value.code, raised.value.exit_code) == (code, 2)


@pytest.mark.parametrize(("raw", "code"), [BAD_REQUESTS[0], BAD_REQUESTS[2]])
def test_bad_request_file_is_one_error_line(cli, tmp_path: Path, raw: str, code: str):
    request = tmp_path / "req.json"
    request.write_text(raw)

    done = cli("exec", "run", "--request", str(request))

    assert done.code == 2
    one_error_line(done.stderr, code)


def test_out_into_a_missing_directory_is_refused_before_running(cli, tmp_path: Path):
    marker = tmp_path / "ran"
    request = json.dumps(
        {"command": "sh", "argv": ["-c", "touch ran"], "workspace_root": "."}
    )

    done = cli(
        "exec", "run", "--request", "-", "--out", str(tmp_path / "no" / "o.json"),
        input=request.encode(), cwd=tmp_path,
    )  # fmt: skip

    assert done.code == 2
    one_error_line(done.stderr, "usage_error")
    assert not marker.exists()


def test_out_that_is_a_directory_is_refused(cli, tmp_path: Path):
    done = cli(
        "exec", "run", "--request", "-", "--out", str(tmp_path),
        input=b'{"command": "true"}',
    )  # fmt: skip

    assert done.code == 2
    one_error_line(done.stderr, "usage_error")


@pytest.mark.parametrize("command", ["replay", "verify"])
def test_garbage_result_file_is_one_error_line(cli, tmp_path: Path, command: str):
    garbage = tmp_path / "res.json"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 100)
    argv = ("exec", "replay") if command == "replay" else ("digest", "verify")

    done = cli(*argv, "--result", str(garbage))

    assert done.code == 2
    one_error_line(done.stderr, "json_parse_error")


def test_doctor_creates_no_folder_for_a_sqlite_url(cli, tmp_path: Path):
    folder = tmp_path / "not" / "there"

    done = cli("doctor", "--json", env={"DATABASE_URL": f"sqlite:///{folder}/x.db"})

    database = next(
        c for c in json.loads(done.stdout)["checks"] if c["name"] == "database"
    )
    assert database["status"] == "warning"
    assert not (tmp_path / "not").exists()


# -- a disk that refuses writes ----------------------------------------------------


class FullDiskCAS(LocalCAS):
    """A CAS on a full disk: every streamed put fails as the kernel would say."""

    def put_stream(self, stream, *, durable: bool = True) -> str:
        stream.read(1 << 16)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_capturing_is_storage_failed_and_caches_nothing(home: Path):
    engine = make_engine(FullDiskCAS)
    request = shell("head -c 3000000 /dev/zero")

    with pytest.raises(RequiemError) as raised:
        engine.run(request)

    assert (raised.value.code, raised.value.exit_code) == ("storage_failed", 6)
    assert "No space left on device" in raised.value.message
    retry = make_engine().run(request)
    assert (retry.cache_hit, retry.exit_code, retry.stdout_size) == (
        False,
        0,
        3_000_000,
    )


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


@pytest.mark.skipif(not shutil.which("bwrap"), reason="needs bubblewrap")
def test_cli_run_whose_stdout_cannot_be_stored_says_so(home: Path, tmp_path: Path):
    # RLIMIT_FSIZE makes the CAS's writes fail with EFBIG, as a full disk would.
    done = subprocess.run(
        [sys.executable, "-m", "requiem", "run", "--", "head", "-c", "5000000",
         "/dev/urandom"],
        capture_output=True, cwd=tmp_path, preexec_fn=_limit_file_size,
        timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 6
    one_error_line(done.stderr.decode(), "cas_storage_full")


# -- the action cache --------------------------------------------------------------


def test_cache_entry_naming_another_requests_result_is_a_miss(home: Path):
    engine = make_engine()
    other = engine.run(shell("echo other"))
    request = shell("echo mine")
    normal, _ = engine.normalise(request)
    key = action_cache.cache_key(normal.digest(), normal.inputs)
    assert other.result_blob is not None
    action_cache.store(engine.cas, key, other.result_blob)

    result = engine.run(request)

    assert (result.cache_hit, result.stdout) == (False, "mine\n")


@pytest.mark.parametrize("stored", [b"[1, 2]", b'"text"', b"{}"])
def test_cache_entry_naming_a_non_result_object_is_a_miss(home: Path, stored: bytes):
    engine = make_engine()
    request = shell("echo fine")
    normal, _ = engine.normalise(request)
    key = action_cache.cache_key(normal.digest(), normal.inputs)
    action_cache.store(engine.cas, key, engine.cas.put_bytes(stored))

    result = engine.run(request)

    assert (result.cache_hit, result.stdout) == (False, "fine\n")


# -- the child's resources ---------------------------------------------------------


def test_grandchildren_that_leave_the_session_die_with_the_run(home: Path):
    script = "setsid sh -c 'sleep 300' & (nohup sleep 301 >/dev/null 2>&1 &); sleep 300"

    result = make_engine().run(shell(script, timeout_ms=500))

    assert (result.termination_reason, result.exit_code) == ("timeout", 124)
    alive = subprocess.run(
        ["pgrep", "-f", "sleep 30[01]"], capture_output=True, check=False
    )
    assert alive.stdout == b""


def test_endless_output_stops_at_the_timeout(home: Path):
    result = make_engine().run(shell("yes", timeout_ms=300, max_output_bytes=16))

    assert (result.termination_reason, result.error_code) == ("timeout", "timeout")
    assert result.stdout == "y\n" * 8
    assert result.stdout_truncated


def test_huge_sparse_output_is_refused_without_being_read(cli, tmp_path: Path):
    done = cli(
        "run", "--output", "out", "--output", "small", "--json", "--",
        "sh", "-c", "echo hi > small; truncate -s 5G out",
        cwd=tmp_path,
    )  # fmt: skip

    assert done.code == 5
    one_error_line(done.stderr, "output_too_large")
    result = json.loads(done.stdout)
    assert list(result["output_digests"]) == ["small"]
    assert not (tmp_path / "out").exists()


def test_descriptor_exhaustion_stays_inside_the_limit(home: Path):
    script = "python3 -c 'import os\nwhile True: os.open(\"/dev/null\", 0)'"

    result = make_engine().run(shell(script, policy={"max_fds": 64}))

    assert result.exit_code == 1
    assert "Too many open files" in result.stderr


def test_memory_hog_fails_inside_its_address_space_limit(home: Path):
    script = "python3 -c 'b = bytearray(512 << 20)'"

    result = make_engine().run(shell(script, policy={"max_memory_bytes": 256 << 20}))

    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


def test_digest_of_caller_secret_value_is_not_in_the_stored_request(home: Path):
    engine = make_engine()
    result = engine.run(shell("true", env={"SERVICE_TOKEN": "s3cr3t-value"}))

    stored = engine.cas.get_bytes(result.request_blob or "")
    assert b"s3cr3t-value" not in stored
    assert dg.canonical_json(result.request).find(b"s3cr3t") == -1
