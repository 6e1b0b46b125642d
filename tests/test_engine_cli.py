"""``requiem run``, ``exec run``, ``exec replay`` and ``digest verify --result``.

Each test runs the real command in subprocesses; callers that must not influence
one another run concurrently to keep the file fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PLANTED = {
    "GITHUB_TOKEN": "planted-github-token",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret",
    "MY_SERVICE_PASSWORD": "planted-password",
    "REQUIEM_SECRET_KEY": "planted-requiem-secret",
    "REQUIEM_API_KEY": "planted-requiem-api-key",
}


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def requiem(
    *args: str, env: dict[str, str] | None = None, cwd: Path, umask: str = "022"
) -> Ran:
    """The real CLI under a chosen caller environment, umask and directory."""
    argv = ["sh", "-c", f'umask {umask} && exec "$0" "$@"', sys.executable]
    proc = subprocess.run(
        [*argv, "-m", "requiem", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )
    return Ran(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_run_gives_one_result_digest_whatever_the_caller_environment(
    home: Path, tmp_path: Path
):
    workspaces = [tmp_path / f"caller-{n}" / "ws" for n in range(3)]
    for workspace in workspaces:
        (workspace / "src").mkdir(parents=True)
        (workspace / "src" / "b.txt").write_text("bravo\n")
        (workspace / "src" / "a.txt").write_text("alpha\n")
    script = (
        "date; ls -l src; : > new; stat -c '%A %U %n' new; env | sort; "
        "python3 -c 'print(hash(\"x\"))'; cat src/*.txt > joined"
    )
    tail = ["--output", "joined", "--json", "--", "sh", "-c", script]
    callers = [
        ({"TZ": "Asia/Tokyo", "LANG": "de_DE.UTF-8", **PLANTED}, "077", tmp_path),
        ({"TZ": "America/New_York", "LC_ALL": "C"}, "002", Path("/")),
        ({"TZ": "UTC", "LANG": "fr_FR.UTF-8", "HOME": "/root"}, "022", workspaces[2]),
    ]

    def call(n: int) -> Ran:
        env, umask, cwd = callers[n]
        args = ["run", "--workspace", str(workspaces[n]), *tail]
        return requiem(*args, env=env, umask=umask, cwd=cwd)

    with ThreadPoolExecutor(len(callers)) as pool:
        runs = list(pool.map(call, range(len(callers))))

    assert [r.code for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    results = [json.loads(r.stdout) for r in runs]
    assert len({r["result_digest"] for r in results}) == 1
    assert len({r["stdout_digest"] for r in results}) == 1
    first = results[0]
    assert first["stdout"].startswith("Tue Jan  1 00:00:00 UTC 1980\n")
    assert "-rw-r--r-- 1 requiem requiem 6 Jan  1  1980 a.txt\n" in first["stdout"]
    assert "-rw-r--r-- requiem new\n" in first["stdout"]
    assert "TZ=UTC\n" in first["stdout"] and "LC_ALL=C.UTF-8\n" in first["stdout"]
    for planted in PLANTED.values():
        assert all(planted not in r.stdout + r.stderr for r in runs)
    assert all((w / "joined").read_text() == "alpha\nbravo\n" for w in workspaces)


def test_exec_run_writes_a_result_that_replays_and_verifies(home: Path, tmp_path: Path):
    request = {"command": "sh", "argv": ["-c", "echo same > f; cat f"]}
    request["outputs"] = ["f"]
    (tmp_path / "req.json").write_text(json.dumps(request))

    ran = requiem(
        "exec", "run", "--request", "req.json", "--out", "res.json", cwd=tmp_path
    )
    stored = json.loads((tmp_path / "res.json").read_text())
    edited = {**stored, "exit_code": 1}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    jobs = [
        ("exec", "replay", "--result", "res.json", "--json"),
        ("digest", "verify", "--result", "res.json", "--json"),
        ("digest", "verify", "--result", "edited.json"),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replayed, verified, caught = pool.map(
            lambda args: requiem(*args, cwd=tmp_path), jobs
        )

    assert ran.code == 0, ran.stderr
    assert stored["stdout"] == "same\n"
    assert replayed.code == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert (report["ok"], report["differences"]) == (True, [])
    assert report["replayed"]["result_digest"] == stored["result_digest"]
    assert verified.code == 0, verified.stderr
    checks = json.loads(verified.stdout)["checks"]
    assert [c["name"] for c in checks] == [
        "request_digest",
        "trace_digest",
        "result_digest",
        "stdout",
        "stderr",
        "output:f",
        "request_blob",
        "result_blob",
    ]
    assert all(c["ok"] for c in checks)
    assert caught.code == 4
    last = caught.stderr.strip().splitlines()[-1]
    assert last.startswith("requiem: error[result_verify_failed]: 2 check(s) failed")
    assert "first: result_digest" in last


def test_replay_of_a_urandom_reader_is_drift_naming_stdout(home: Path, tmp_path: Path):
    request = {"command": "sh", "argv": ["-c", "head -c 16 /dev/urandom | od -An"]}
    (tmp_path / "req.json").write_text(json.dumps(request))

    ran = requiem(
        "exec", "run", "--request", "req.json", "--out", "res.json", cwd=tmp_path
    )
    replayed = requiem("exec", "replay", "--result", "res.json", cwd=tmp_path)

    assert ran.code == 0, ran.stderr
    assert replayed.code == 5
    last = replayed.stderr.strip().splitlines()[-1]
    assert last.startswith("requiem: error[drift_detected]: replay differs in ")
    assert "first: stdout_digest: expected" in last


def test_cli_exit_codes_for_each_way_a_run_can_fail(home: Path, tmp_path: Path):
    (tmp_path / "dup.json").write_text('{"command": "a", "command": "b"}')
    jobs = {
        "dup": ("exec", "run", "--request", "dup.json"),
        "timeout": ("run", "--timeout-ms", "300", "--", "sleep", "30"),
        "missing": ("run", "--output", "never", "--", "true"),
        "spawn": ("run", "--", "no-such-program"),
        "strict": ("run", "--strict", "--", "true"),
    }
    no_bwrap = {"strict": {"REQUIEM_BWRAP": "/nonexistent/bwrap"}}

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            name: pool.submit(requiem, *args, env=no_bwrap.get(name), cwd=tmp_path)
            for name, args in jobs.items()
        }
    done = {name: future.result() for name, future in futures.items()}

    def last_line(name: str) -> str:
        return done[name].stderr.strip().splitlines()[-1]

    assert done["dup"].code == 2
    assert last_line("dup").startswith("requiem: error[json_duplicate_key]: ")
    assert done["timeout"].code == 124
    assert last_line("timeout") == "requiem: error[timeout]: timed out after 300 ms"
    assert done["missing"].code == 5
    assert last_line("missing") == (
        "requiem: error[missing_output]: declared output 'never' was not produced"
    )
    assert done["spawn"].code == 127
    assert last_line("spawn") == (
        "requiem: error[spawn_failed]: command 'no-such-program' was not found"
    )
    assert done["strict"].code == 6
    assert last_line("strict") == (
        "requiem: error[sandbox_unavailable]: strict mode refuses to run without: "
        "bubblewrap"
    )
