"""Running requests in-process against a real CAS, bwrap, libfaketime and prlimit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from requiem import digest as dg
from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest
from requiem.errors import RequiemError

NO_BWRAP = {"REQUIEM_BWRAP": "/nonexistent/bwrap"}


def make_engine(**overrides: str) -> Engine:
    config = settings.load({**os.environ, **overrides})
    return Engine(LocalCAS.from_settings(config), config)


@pytest.fixture
def engine(home: Path) -> Engine:
    return make_engine()


@pytest.fixture
def bare_engine(home: Path) -> Engine:
    """An engine on a machine without bubblewrap (the binary cannot be found)."""
    return make_engine(**NO_BWRAP)


def shell(script: str, **fields) -> ExecutionRequest:
    return ExecutionRequest.from_mapping(
        {"command": "sh", "argv": ["-c", script], **fields}
    )


def test_run_captures_streams_outputs_and_fixed_environment(
    engine: Engine, tmp_path: Path
):
    (tmp_path / "in.txt").write_text("hello\n")
    request = shell(
        "cat in.txt | tr a-z A-Z > out.txt; date +%s; pwd; hostname; id -u; echo e >&2",
        workspace_root=str(tmp_path),
        outputs=["out.txt"],
    )

    result = engine.run(request)

    assert (result.ok, result.exit_code, result.error_code) == (True, 0, None)
    assert result.stdout == "315532800\n/workspace\nrequiem\n1000\n"
    assert result.stderr == "e\n"
    assert result.output_digests == {"out.txt": dg.of_bytes(b"HELLO\n")}
    assert engine.cas.get_bytes(result.stdout_digest) == result.stdout.encode()
    assert result.request["inputs"] == {"in.txt": dg.of_bytes(b"hello\n")}
    assert "workspace_root" not in result.request
    assert result.sandbox_applied["not_enforced"] == []
    assert [e["event"] for e in result.trace_events] == [
        "inputs_materialised",
        "process_started",
        "process_exited",
        "stream_captured",
        "stream_captured",
        "output_captured",
    ]


def test_result_digest_covers_only_reproducible_fields(engine: Engine):
    result = engine.run(shell("echo same"), use_cache=False)
    again = engine.run(shell("echo same"), use_cache=False)

    assert again.result_digest == result.result_digest
    assert again.result_digest == dg.of_record("res", result.reproducible())
    assert result.trace_digest == dg.of_record("trace", result.trace_events)
    assert result.request_digest == dg.of_record("req", result.request)


def test_materialised_inputs_have_fixed_times_and_content_derived_modes(
    engine: Engine, tmp_path: Path
):
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("x")
    os.chmod(tmp_path / "data" / "x.txt", 0o600)

    result = engine.run(
        shell(
            "stat -c '%n %a %Y' tool.sh data data/x.txt; ./tool.sh",
            workspace_root=str(tmp_path),
        )
    )

    assert result.stdout == (
        "tool.sh 755 315532800\ndata 755 315532800\ndata/x.txt 644 315532800\ntool\n"
    )


def test_secrets_in_request_env_never_reach_the_child(engine: Engine):
    request = shell(
        "env | sort",
        env={"GREETING": "hi", "GITHUB_TOKEN": "tok-123", "DB_PASSWORD": "pw-456"},
    )

    result = engine.run(request)

    assert "GREETING=hi" in result.stdout
    assert "tok-123" not in result.stdout and "pw-456" not in result.stdout
    assert result.request["env"] == {"GREETING": "hi"}
    assert result.policy_applied["env_secret_stripped"] == [
        "DB_PASSWORD",
        "GITHUB_TOKEN",
    ]
    stored = engine.cas.get_bytes(result.result_blob)
    assert b"tok-123" not in stored and b"pw-456" not in stored


def test_identical_request_is_answered_from_the_action_cache(engine: Engine):
    first = engine.run(shell("echo cached", request_id="one"))
    second = engine.run(shell("echo cached", request_id="two"))
    fresh = engine.run(shell("echo cached"), use_cache=False)
    other_nonce = engine.run(shell("echo cached", nonce="n-2"))

    assert (first.cache_hit, second.cache_hit, fresh.cache_hit) == (
        False,
        True,
        False,
    )
    assert second.result_digest == first.result_digest
    assert second.request_id == "two"
    assert other_nonce.cache_hit is False
    assert other_nonce.request_digest != first.request_digest
    key = dg.of_record("cache", {"request_digest": first.request_digest, "inputs": {}})
    entry = engine.cas.root / "v2" / "ac" / key[:2] / key
    # The uncached run refreshed the entry: it points at the latest result.
    assert dg.parse_json(entry.read_bytes()) == {"result_blob": fresh.result_blob}
    stored = dg.parse_json(engine.cas.get_bytes(first.result_blob))
    assert stored["kind"] == "requiem.result"
    request_doc = dg.parse_json(engine.cas.get_bytes(first.request_blob))
    assert request_doc == {"kind": "requiem.request", "request": first.request}


def test_previews_are_capped_but_streams_are_stored_whole(engine: Engine):
    request = shell("head -c 100000 /dev/zero | tr '\\0' x", max_output_bytes=10)

    result = engine.run(request)

    assert result.stdout == "x" * 10
    assert (result.stdout_truncated, result.stdout_size) == (True, 100_000)
    assert result.stdout_digest == dg.of_bytes(b"x" * 100_000)
    assert result.stderr_truncated is False


@pytest.mark.parametrize("bwrap", [True, False], ids=["bwrap", "no-bwrap"])
def test_timeout_kills_a_grandchild_that_called_setsid(
    home: Path, tmp_path: Path, bwrap: bool
):
    engine = make_engine() if bwrap else make_engine(**NO_BWRAP)
    flag = _unique_sleep()
    request = shell(f"setsid sh -c 'sleep {flag}' & sleep 60", timeout_ms=400)

    result = engine.run(request)

    assert (result.exit_code, result.termination_reason, result.error_code) == (
        124,
        "timeout",
        "timeout",
    )
    assert result.trace_events[2] == {
        "seq": 2,
        "event": "process_timed_out",
        "timeout_ms": 400,
    }
    assert _processes_named(flag) == []


def test_a_daemon_left_behind_by_a_finished_run_is_killed(bare_engine: Engine):
    flag = _unique_sleep()
    request = shell(f"setsid sh -c 'sleep {flag}' >/dev/null 2>&1 & echo")

    result = bare_engine.run(request)

    assert (result.exit_code, result.termination_reason) == (0, "exited")
    assert result.sandbox_applied["leftover_processes_killed"] >= 1
    assert _processes_named(flag) == []


def _unique_sleep() -> str:
    """A sleep duration no other process on the machine is using (to find it)."""
    return f"600.{time.time_ns() % 10**9:09d}"


def _processes_named(flag: str) -> list[int]:
    """Live processes whose command line is ``sleep <flag>``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as stream:
                cmdline = stream.read()
            with open(f"/proc/{name}/stat", "rb") as stream:
                state = stream.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline == b"sleep\0" + flag.encode() + b"\0" and state != b"Z":
            found.append(int(name))
    return found


def test_missing_output_is_reported_in_the_result(engine: Engine):
    result = engine.run(shell("echo done > made", outputs=["made", "never"]))

    assert (result.ok, result.exit_code, result.error_code) == (
        False,
        0,
        "missing_output",
    )
    assert list(result.output_digests) == ["made"]
    assert result.trace_events[-1] == {
        "seq": 6,
        "event": "output_missing",
        "path": "never",
        "reason": "absent",
    }


def test_output_symlink_leading_outside_is_a_path_escape(engine: Engine):
    result = engine.run(shell("ln -s /etc/hostname leak", outputs=["leak"]))

    assert (result.ok, result.error_code) == (False, "path_escape")
    assert result.output_digests == {}


def test_workspace_symlink_leading_outside_is_refused(engine: Engine, tmp_path: Path):
    (tmp_path / "leak").symlink_to("/etc/hostname")

    with pytest.raises(RequiemError) as caught:
        engine.run(shell("cat leak", workspace_root=str(tmp_path)))

    assert caught.value.code == "path_escape"


def test_unknown_command_is_spawn_failed_without_spawning(engine: Engine):
    result = engine.run(ExecutionRequest.from_mapping({"command": "no-such-tool"}))

    assert (result.exit_code, result.termination_reason, result.error_code) == (
        127,
        "spawn_failed",
        "spawn_failed",
    )
    assert result.trace_events[1] == {
        "seq": 1,
        "event": "spawn_failed",
        "command": "no-such-tool",
        "reason": "not_found",
    }


def test_unknown_command_without_bwrap_is_spawn_failed(bare_engine: Engine):
    result = bare_engine.run(ExecutionRequest.from_mapping({"command": "./nope"}))

    assert (result.exit_code, result.error_code) == (127, "spawn_failed")


def test_input_digest_not_in_cas_is_missing_input(engine: Engine):
    request = ExecutionRequest.from_mapping(
        {"command": "true", "inputs": {"a.txt": "b" * 64}}
    )

    with pytest.raises(RequiemError) as caught:
        engine.run(request)

    assert (caught.value.code, caught.value.http_status) == ("missing_input", 404)


def test_required_env_that_is_a_secret_is_env_required_missing(engine: Engine):
    request = shell(
        "true",
        env={"API_TOKEN": "x"},
        policy={"env_required": ["API_TOKEN"]},
    )

    with pytest.raises(RequiemError) as caught:
        engine.run(request)

    assert caught.value.code == "env_required_missing"
    assert "x" not in caught.value.message.split("API_TOKEN")[-1]


def test_strict_mode_without_bubblewrap_is_sandbox_unavailable(bare_engine: Engine):
    with pytest.raises(RequiemError) as caught:
        bare_engine.run(shell("true", policy={"mode": "strict"}))

    assert (caught.value.code, caught.value.http_status) == (
        "sandbox_unavailable",
        503,
    )


def test_default_mode_without_bubblewrap_runs_and_says_so(bare_engine: Engine):
    result = bare_engine.run(shell("pwd"))

    assert result.ok
    assert result.stdout.startswith("/tmp/requiem-work/")
    assert result.sandbox_applied["bubblewrap"] is False
    assert "filesystem_isolation" in result.sandbox_applied["not_enforced"]


def test_network_is_cut_inside_the_sandbox(engine: Engine):
    result = engine.run(shell("cat /proc/net/dev | tail -n +3 | cut -d: -f1"))

    assert result.stdout.split() == ["lo"]


def test_fd_limit_is_applied(engine: Engine):
    result = engine.run(shell("ulimit -n", policy={"max_fds": 64}))

    assert result.stdout == "64\n"
    assert result.sandbox_applied["rlimits"] == {"max_fds": 64}


def test_wall_clock_mode_sees_the_real_clock_and_is_recorded(engine: Engine):
    result = engine.run(shell("date +%s", policy={"time_mode": "wall_clock"}))

    assert int(result.stdout) > time.time() - 3600
    assert result.policy_applied["time_mode"] == "wall_clock"
    assert result.sandbox_applied["clock"] == "real"


def test_replay_of_a_deterministic_run_is_identical(engine: Engine):
    result = engine.run(shell("echo stable > f; cat f", outputs=["f"]))

    report = engine.replay(result)

    assert (report.ok, report.differences) == (True, [])
    assert report.replayed.result_digest == result.result_digest


def test_replay_of_a_random_reader_names_stdout_first(engine: Engine):
    result = engine.run(
        shell("head -c 16 /dev/urandom | od -An -tx1 | tee r", outputs=["r"])
    )

    report = engine.replay(result)

    assert report.ok is False
    fields = [d.field for d in report.differences]
    assert fields == ["stdout_digest", "output:r", "trace_digest", "result_digest"]
    name, expected, actual = report.differences[0]
    assert (name, expected) == ("stdout_digest", result.stdout_digest)
    assert actual == report.replayed.stdout_digest


def test_replay_whose_input_left_the_cas_is_replay_failed(
    engine: Engine, tmp_path: Path
):
    (tmp_path / "in.txt").write_text("gone soon\n")
    result = engine.run(shell("cat in.txt", workspace_root=str(tmp_path)))
    engine.cas.remove(result.request["inputs"]["in.txt"])

    with pytest.raises(RequiemError) as caught:
        engine.replay(result)

    assert (caught.value.code, caught.value.exit_code) == ("replay_failed", 5)
    assert "missing_input" in caught.value.message


def test_an_old_copy_of_a_declared_output_is_not_an_input(
    engine: Engine, tmp_path: Path
):
    request = shell("echo fresh > out.txt", workspace_root=str(tmp_path))
    request = request.model_copy(update={"outputs": ["out.txt"]})
    first = engine.run(request)
    (tmp_path / "out.txt").write_text("stale copy from the last run\n")

    second = engine.run(request)

    assert second.cache_hit is True
    assert second.request_digest == first.request_digest
    assert second.request["inputs"] == {}


def test_cwd_is_created_inside_the_workspace(engine: Engine, tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.txt").write_text("m\n")

    result = engine.run(
        shell("pwd; cat mod.txt", cwd="pkg", workspace_root=str(tmp_path))
    )

    assert result.stdout == "/workspace/pkg\nm\n"


def test_memory_limit_makes_large_allocations_fail(engine: Engine):
    script = "python3 -c 'b = bytearray(400 * 2**20)' 2>&1 | tail -n 1"
    request = shell(script, policy={"max_memory_bytes": 200 * 2**20})

    result = engine.run(request)

    assert result.stdout == "MemoryError\n"
    assert result.sandbox_applied["rlimits"]["max_memory_bytes"] == 200 * 2**20


def test_identical_requests_at_once_take_turns_and_agree(engine: Engine):
    from concurrent.futures import ThreadPoolExecutor

    request = shell("echo together > f; cat f", outputs=["f"], nonce="turns")

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: engine.run(request), range(3)))

    assert {r.result_digest for r in results} == {results[0].result_digest}
    assert sum(not r.cache_hit for r in results) == 1


def test_a_work_directory_others_can_write_is_refused(home: Path, tmp_path: Path):
    shared = tmp_path / "shared-work"
    shared.mkdir()
    os.chmod(shared, 0o777)
    engine = make_engine(REQUIEM_WORK_DIR=str(shared))

    with pytest.raises(RequiemError) as caught:
        engine.run(shell("true"))

    assert (caught.value.code, caught.value.exit_code) == ("config_error", 2)
