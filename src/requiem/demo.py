"""``make demo``: Requiem's promises shown on real tools nobody here wrote.

Three real jobs — a C program built with the system's ``gcc`` (it embeds ``__DATE__``
and ``__TIME__``), a directory packed with ``tar`` and ``gzip``, and a wheel of a small
Python project built by ``pip wheel`` — each run twice through ``requiem run`` from two
different caller environments (timezone, locale, umask, working directory), each time
in a fresh checkout of the job's files. The same commands are also run bare, the way a
person would, from the same two environments. Then one CAS object is corrupted by
hand and ``requiem cas verify --all`` must catch it, and a command reading
``/dev/urandom`` is replayed and must be reported as drift.

Every step is a real subprocess of the ``requiem`` command, against a private
``REQUIEM_HOME`` under ``.requiem/demo`` (wiped first, so each run proves things
afresh). The demo needs neither root nor bubblewrap nor libfaketime: what the sandbox
could not enforce on this machine is reported. Exit status 0 means every claim held.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from requiem import digest

DEMO_HOME = Path(".requiem") / "demo"
STEP_TIMEOUT_S = 120
# The operator's choice of sandbox tools is kept; every other Requiem setting is the
# demo's own.
SANDBOX_SETTINGS = ("REQUIEM_BWRAP", "REQUIEM_FAKETIME_LIB")


@dataclass(frozen=True)
class Caller:
    """How the person starting a command happens to have set up their shell."""

    name: str
    tz: str
    lang: str
    umask: int


CALLERS = (
    Caller("caller A", "UTC", "C.UTF-8", 0o022),
    # A POSIX TZ rule (UTC+14, as in Kiritimati) works even without tzdata installed.
    Caller("caller B", "<+14>-14", "C", 0o077),
)


@dataclass(frozen=True)
class Job:
    name: str
    assets: str
    argv: list[str]
    outputs: list[str]
    read_only: list[str]


@dataclass
class Claim:
    claim: str
    held: bool
    evidence: str


def _python_prefixes() -> list[str]:
    """The interpreter, the venv and the stdlib, which ``pip wheel`` must read."""
    paths = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"]}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    return sorted(p for p in paths if Path(p).exists())


def jobs() -> list[Job]:
    python = sys.executable
    return [
        Job(
            "gcc: C program embedding __DATE__/__TIME__",
            "csrc",
            ["gcc", "-O2", "-o", "stamp", "stamp.c"],
            ["stamp"],
            [],
        ),
        Job(
            "tar + gzip: a directory of files",
            "bundle",
            ["sh", "-c", "tar -cf - README.txt data notes | gzip > bundle.tar.gz"],
            ["bundle.tar.gz"],
            [],
        ),
        Job(
            "pip wheel: a small Python project",
            "tinyproj",
            [
                python,
                "-m",
                "pip",
                "--isolated",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--wheel-dir",
                "dist",
                ".",
            ],
            ["dist/tinyproj-1.0.0-py3-none-any.whl"],
            _python_prefixes(),
        ),
    ]


class Demo:
    def __init__(self, root: Path, console: Console) -> None:
        self.root = root.resolve()
        self.home = self.root / DEMO_HOME
        self.console = console
        self.claims: list[Claim] = []
        self.not_enforced: set[str] = set()
        self.checkouts = 0

    # -- plumbing ------------------------------------------------------------------

    def env(self, caller: Caller | None = None) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if k in SANDBOX_SETTINGS
            or (not k.startswith("REQUIEM_") and k != "DATABASE_URL")
        }
        base["REQUIEM_HOME"] = str(self.home)
        base["REQUIEM_LOG_LEVEL"] = "warning"
        if caller:
            base.update(TZ=caller.tz, LANG=caller.lang, LC_ALL=caller.lang)
        return base

    def requiem(
        self, *args: str, caller: Caller | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "requiem", *args],
            capture_output=True,
            text=True,
            env=self.env(caller),
            cwd=cwd or self.root,
            umask=caller.umask if caller else -1,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )

    def checkout(self, assets: str, caller: Caller) -> Path:
        """A fresh copy of ``assets`` written as the caller would (their umask)."""
        self.checkouts += 1
        target = self.home / "checkouts" / f"{self.checkouts:02d}-{assets}"
        source = resources.files("requiem.demo_assets").joinpath(assets)
        old = os.umask(caller.umask)
        try:
            _write_tree(source, target)
        finally:
            os.umask(old)
        return target

    def claim(self, text: str, held: bool, evidence: str) -> None:
        self.claims.append(Claim(text, held, evidence))

    # -- the jobs ------------------------------------------------------------------

    def through_requiem(self, job: Job, caller: Caller, index: int) -> dict[str, Any]:
        workspace = self.checkout(job.assets, caller)
        args = ["run", "--workspace", str(workspace), "--no-cache", "--json"]
        for path in job.outputs:
            args += ["--output", path]
        for path in job.read_only:
            args += ["--ro", path]
        elsewhere = self.home / "callers" / f"{index}"
        elsewhere.mkdir(parents=True, exist_ok=True)
        proc = self.requiem(*args, "--", *job.argv, caller=caller, cwd=elsewhere)
        if proc.returncode != 0:
            said = proc.stderr.strip().splitlines()
            raise DemoStepFailed(f"requiem run failed: {said[-1] if said else ''}")
        result = json.loads(proc.stdout)
        applied = result.get("sandbox_applied") or {}
        self.not_enforced.update(applied.get("not_enforced") or [])
        return result

    def bare(self, job: Job, caller: Caller) -> dict[str, str]:
        """The same command run directly in a fresh checkout; digests of its outputs."""
        workspace = self.checkout(job.assets, caller)
        env = self.env(caller)
        proc = subprocess.run(
            job.argv,
            cwd=workspace,
            env=env,
            umask=caller.umask,
            capture_output=True,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            raise DemoStepFailed(
                f"bare {job.argv[0]} failed: {said[-1] if said else ''}"
            )
        return {path: digest.of_file(workspace / path) for path in job.outputs}

    def job(self, job: Job) -> None:
        results = []
        bare = []
        for index, caller in enumerate(CALLERS):
            results.append(self.through_requiem(job, caller, index))
            bare.append(self.bare(job, caller))

        first, second = results
        same = (
            first["result_digest"] == second["result_digest"]
            and first["output_digests"] == second["output_digests"]
        )
        fresh = not first.get("cache_hit") and not second.get("cache_hit")
        outputs = ", ".join(
            f"{Path(p).name} {d[:12]}"
            for p, d in sorted(first["output_digests"].items())
        )
        self.claim(
            f"{job.name}: same result through Requiem from both callers",
            same and fresh and set(first["output_digests"]) == set(job.outputs),
            f"result {first['result_digest'][:12]} / {second['result_digest'][:12]};"
            f" {outputs}",
        )
        differs = all(bare[0][p] != bare[1][p] for p in job.outputs)
        shown = "; ".join(
            f"{Path(p).name} {bare[0][p][:12]} vs {bare[1][p][:12]}"
            for p in job.outputs
        )
        self.claim(f"{job.name}: bare runs differ", differs, shown)

    # -- integrity and drift -------------------------------------------------------

    def corrupt_and_verify(self) -> None:
        from requiem.cas.store import LocalCAS

        clean = self.requiem("cas", "verify", "--all")
        cas = LocalCAS(self.home / "cas")
        victim = next(iter(cas.iter_digests()))
        blob = cas.blob_path(victim)
        damaged = bytearray(blob.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        blob.chmod(0o644)  # stored objects are read-only; their owner may still write
        blob.write_bytes(bytes(damaged))

        caught = self.requiem("cas", "verify", "--all")
        named = victim in caught.stdout + caught.stderr
        code = _error_code(caught.stderr)
        self.claim(
            "cas verify --all catches one flipped bit in a stored object",
            clean.returncode == 0 and caught.returncode == 4 and named,
            f"clean store: exit {clean.returncode}; one bit of {victim[:12]} flipped:"
            f" exit {caught.returncode} {code}, object"
            f" {'named' if named else 'NOT named'}",
        )

    def replay_drift(self) -> None:
        workdir = self.home / "replay"
        workdir.mkdir(parents=True, exist_ok=True)
        request = {
            "command": "sh",
            "argv": ["-c", "head -c 16 /dev/urandom | od -An -tx1"],
        }
        (workdir / "request.json").write_text(json.dumps(request))
        ran = self.requiem(
            "exec",
            "run",
            "--request",
            "request.json",
            "--out",
            "result.json",
            cwd=workdir,
        )
        replayed = self.requiem(
            "exec", "replay", "--result", "result.json", cwd=workdir
        )
        self.claim(
            "replaying a command that reads /dev/urandom reports drift",
            ran.returncode == 0
            and replayed.returncode == 5
            and _error_code(replayed.stderr) == "[drift_detected]",
            f"exec run: exit {ran.returncode}; exec replay: exit"
            f" {replayed.returncode} {_error_code(replayed.stderr)}",
        )

    # -- the whole demo ------------------------------------------------------------

    def run(self) -> bool:
        if self.home.exists():
            shutil.rmtree(self.home)
        self.home.mkdir(parents=True)

        steps: list[tuple[str, Callable[[], None]]] = [
            (job.name, lambda job=job: self.job(job)) for job in jobs()
        ]
        steps += [
            ("cas verify", self.corrupt_and_verify),
            ("replay drift", self.replay_drift),
        ]
        for name, step in steps:
            started = time.perf_counter()
            try:
                step()
            except (DemoStepFailed, OSError, ValueError, KeyError) as exc:
                self.claim(name, False, f"{type(exc).__name__}: {exc}")
            took = time.perf_counter() - started
            self.console.print(Text(f"… {name}: {took:.1f} s", style="dim"))
        return all(c.held for c in self.claims)


class DemoStepFailed(Exception):
    """A step could not even produce its evidence."""


def _error_code(stderr: str) -> str:
    """The ``error[code]`` of the last error line a command printed, or ''."""
    found = re.findall(r"error\[([a-z0-9_]+)\]", stderr)
    return f"[{found[-1]}]" if found else ""


def _write_tree(source: Any, target: Path) -> None:
    """Copy a resource tree by writing each file anew (new mtime, caller's umask)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            _write_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


def render(demo: Demo, seconds: float, console: Console) -> None:
    grid = Table(title="What the demo proved", show_lines=False, header_style="bold")
    grid.add_column("claim")
    grid.add_column("held")
    grid.add_column("evidence")
    for claim in demo.claims:
        mark = "[green]yes[/green]" if claim.held else "[red]NO[/red]"
        grid.add_row(Text(claim.claim), mark, Text(claim.evidence))
    console.print(grid)
    callers = "; ".join(
        f"{c.name}: TZ={c.tz} LANG={c.lang} umask {c.umask:03o}" for c in CALLERS
    )
    console.print(f"callers: {callers}", highlight=False)
    unenforced = ", ".join(sorted(demo.not_enforced)) or "nothing"
    console.print(f"not enforced on this machine: {unenforced}", highlight=False)
    console.print(f"took {seconds:.1f} s; state in {demo.home}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m requiem.demo")
    parser.add_argument("--json", action="store_true", help="claims as JSON on stdout")
    args = parser.parse_args(argv)

    console = Console(stderr=args.json, highlight=False)
    demo = Demo(Path.cwd(), console)
    started = time.perf_counter()
    ok = demo.run()
    seconds = time.perf_counter() - started

    if args.json:
        body = {
            "ok": ok,
            "claims": [asdict(c) for c in demo.claims],
            "not_enforced": sorted(demo.not_enforced),
            "seconds": round(seconds, 1),
        }
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    render(demo, seconds, console)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
