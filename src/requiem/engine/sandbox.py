"""What isolation this machine offers, and the command line that applies it.

Three tools do the enforcing, each found once and tried for real by :func:`probe`:

* bubblewrap (``bwrap``): new user, PID, network, IPC, UTS and mount namespaces;
  system directories read-only, the workspace read-write at the fixed path
  ``/workspace``, a private ``/tmp``, synthetic ``/etc/passwd``, ``group``,
  ``hosts`` and ``hostname``, nothing else of the host. ``--die-with-parent`` plus the
  PID namespace mean killing bwrap kills every process of the run, even one that
  called ``setsid``.
* libfaketime (``LD_PRELOAD``): the clock the child reads is frozen at
  ``SOURCE_DATE_EPOCH``. It cannot reach statically linked programs.
* ``prlimit`` (util-linux): rlimits for memory, file descriptors, CPU time and core
  size, applied by exec-ing through it. The engine launches with ``subprocess``,
  ``close_fds`` and no ``preexec_fn``, so CPython forks with ``vfork`` and the limits
  are set by the wrapper in the child, never by Python code between fork and exec.

Whatever is missing is said in ``notes`` here and in the result's
``sandbox_applied``; strict mode refuses to run without it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from requiem import digest as dg
from requiem.settings import Settings

SANDBOX_WORKSPACE = "/workspace"
SANDBOX_UID = 1000
SANDBOX_HOSTNAME = "requiem"
FIXED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_TIMEOUT_S = 10
PROBE_EPOCH = 315532800

FAKETIME_CANDIDATES = (
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)
# Top-level system directories a program needs; symlinks (merged /usr) are
# recreated as symlinks, real directories are bound read-only.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Host files under /etc that programs read and that say nothing about the host.
SHARED_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "mime.types",
    "protocols",
    "services",
)


@dataclass(frozen=True)
class Capabilities:
    """What :func:`probe` found: each tool's path and whether it really worked."""

    bwrap_path: str | None
    bwrap_works: bool
    faketime_path: str | None
    faketime_works: bool
    rlimits: bool
    prlimit_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "bwrap_path": self.bwrap_path,
            "bwrap_works": self.bwrap_works,
            "faketime_path": self.faketime_path,
            "faketime_works": self.faketime_works,
            "rlimits": self.rlimits,
            "prlimit_path": self.prlimit_path,
            "notes": list(self.notes),
        }


_probed: dict[tuple[str | None, str | None], Capabilities] = {}
_probe_lock = threading.Lock()


def find_bwrap(settings: Settings) -> str | None:
    explicit = settings.get("REQUIEM_BWRAP")
    if explicit:
        return str(explicit)
    return shutil.which("bwrap", path=FIXED_PATH)


def find_faketime(settings: Settings) -> str | None:
    explicit = settings.get("REQUIEM_FAKETIME_LIB")
    if explicit:
        return str(explicit)
    for pattern in FAKETIME_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def probe(settings: Settings) -> Capabilities:
    """Find and try bwrap, libfaketime and prlimit once; the answer is cached."""
    key = (find_bwrap(settings), find_faketime(settings))
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(*key)
        return _probed[key]


def _try(argv: list[str], env: dict[str, str]) -> tuple[bool, str]:
    """Run a probe command; (worked, what it printed or why it failed)."""
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            close_fds=True,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return done.returncode == 0, text[:300] or f"exit {done.returncode}"


def _probe(bwrap: str | None, faketime: str | None) -> Capabilities:
    notes: list[str] = []
    base_env = {"PATH": FIXED_PATH, "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    true = shutil.which("true", path=FIXED_PATH) or "/bin/true"

    bwrap_works = False
    if bwrap is None:
        notes.append("bubblewrap (bwrap) not found: no namespaces, no network cut")
    else:
        argv = bwrap_argv(
            bwrap,
            workspace=None,
            etc_dir=None,
            network=False,
            ro_paths=[],
            faketime=None,
            cwd=SANDBOX_WORKSPACE,
        )
        bwrap_works, text = _try([*argv, true], base_env)
        if not bwrap_works:
            notes.append(f"bubblewrap at {bwrap} does not work here: {text}")

    faketime_works = False
    if faketime is None:
        notes.append("libfaketime not found: children read the real clock")
    else:
        date = shutil.which("date", path=FIXED_PATH) or "/bin/date"
        env = {
            **base_env,
            "LD_PRELOAD": faketime,
            "FAKETIME": faketime_spec(PROBE_EPOCH),
        }
        worked, text = _try([date, "+%s"], env)
        faketime_works = worked and text == str(PROBE_EPOCH)
        if not faketime_works:
            notes.append(f"libfaketime at {faketime} does not freeze the clock: {text}")

    prlimit = shutil.which("prlimit", path=FIXED_PATH)
    rlimits = False
    if prlimit is None:
        notes.append("prlimit not found: memory, fd and CPU limits are not enforced")
    else:
        rlimits, text = _try([prlimit, "--nofile=64:64", "--core=0", "--", true], {})
        if not rlimits:
            notes.append(f"prlimit at {prlimit} does not work here: {text}")

    return Capabilities(
        bwrap_path=bwrap,
        bwrap_works=bwrap_works,
        faketime_path=faketime,
        faketime_works=faketime_works,
        rlimits=rlimits,
        prlimit_path=prlimit,
        notes=notes,
    )


def faketime_spec(epoch: int) -> str:
    """libfaketime's absolute (frozen) time format for ``epoch`` in UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def bwrap_argv(
    bwrap: str,
    *,
    workspace: Path | None,
    etc_dir: Path | None,
    network: bool,
    ro_paths: list[str],
    faketime: str | None,
    cwd: str,
) -> list[str]:
    """bwrap's command line up to and including ``--``; the program follows."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-all"]
    if network:
        argv.append("--share-net")
    argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    argv += ["--hostname", SANDBOX_HOSTNAME]

    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):
            argv += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            argv += ["--ro-bind", directory, directory]
    for name in SHARED_ETC:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    if etc_dir is not None:
        for entry in sorted(os.listdir(etc_dir)):
            argv += ["--ro-bind", str(etc_dir / entry), f"/etc/{entry}"]
    if network:
        argv += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]

    if workspace is not None:
        argv += ["--bind", str(workspace), SANDBOX_WORKSPACE]
    else:
        argv += ["--dir", SANDBOX_WORKSPACE]
    for path in ro_paths:
        argv += ["--ro-bind", path, path]
    if faketime is not None:
        if not faketime.startswith("/usr/"):
            argv += ["--ro-bind", faketime, faketime]
        argv += ["--setenv", "LD_PRELOAD", faketime]
    argv += ["--chdir", cwd, "--"]
    return argv


def prlimit_argv(
    prlimit: str,
    *,
    max_memory_bytes: int | None,
    max_fds: int | None,
    max_cpu_seconds: int | None,
) -> list[str]:
    """``prlimit`` with the hard and soft limits set, up to and including ``--``."""
    argv = [prlimit, "--core=0"]
    if max_memory_bytes is not None:
        argv.append(f"--as={max_memory_bytes}:{max_memory_bytes}")
    if max_fds is not None:
        argv.append(f"--nofile={max_fds}:{max_fds}")
    if max_cpu_seconds is not None:
        argv.append(f"--cpu={max_cpu_seconds}:{max_cpu_seconds}")
    return [*argv, "--"]


SYNTHETIC_ETC = {
    "passwd": f"requiem:x:{SANDBOX_UID}:{SANDBOX_UID}:requiem:{SANDBOX_WORKSPACE}:"
    "/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": f"requiem:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
    "hostname": f"{SANDBOX_HOSTNAME}\n",
    "hosts": f"127.0.0.1\tlocalhost {SANDBOX_HOSTNAME}\n::1\tlocalhost\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def synthetic_etc(work_dir: Path) -> Path:
    """The directory of files that stand in for the host's user and name files.

    Their content never changes, so they are written once per work directory
    (into a temporary directory renamed into place) and bound read-only into
    every sandbox.
    """
    digest = dg.of_bytes(dg.canonical_json(SYNTHETIC_ETC))[:16]
    etc_dir = work_dir / f".etc-{digest}"
    if etc_dir.is_dir():
        return etc_dir
    staging = Path(tempfile.mkdtemp(dir=work_dir, prefix=".etc-staging-"))
    for name, text in SYNTHETIC_ETC.items():
        (staging / name).write_text(text)
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, etc_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run won the race
    return etc_dir
