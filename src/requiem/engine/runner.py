"""Spawn one process, stream its output into the CAS, enforce the timeout.

stdout and stderr are each read by a thread straight into ``LocalCAS.put_stream``,
so a stream of any size is hashed whole in constant memory; the first
``preview_bytes`` are kept for the result's preview.

When the run ends — by exiting or by timing out — every process it left behind is
killed, so nothing outlives the run or keeps writing to its workspace. Descendants
are found without cgroups, by reading ``/proc``: the child's process group and
session, every process whose parent chain leads to it, and every process whose
environment carries the run's marker (its unique ``HOME``), which catches a
grandchild that called ``setsid`` and was re-parented to init. Under bubblewrap
the PID namespace does the same job on its own (bwrap runs with
``--die-with-parent``), so no scan is needed there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from requiem import log
from requiem.cas.store import LocalCAS
from requiem.engine.errors import StorageFailed

READ_CHUNK = 1 << 16
KILL_ROUNDS = 50
DRAIN_WAIT_S = 0.5

_log = log.get("requiem.engine.runner")


@dataclass
class Captured:
    """One stream: digest and size of all of it, the first bytes as a preview."""

    digest: str = ""
    size: int = 0
    preview: bytes = b""
    truncated: bool = False
    failure: BaseException | None = None  # why storing the stream failed


@dataclass
class Completed:
    exit_code: int
    termination_reason: str  # exited, timeout, spawn_failed
    stdout: Captured
    stderr: Captured
    duration_ms: int
    peak_memory_bytes: int | None = None
    spawn_error: str | None = None
    killed_leftovers: int = 0


class _PreviewReader:
    """A file-like reader that remembers the first ``cap`` bytes it hands out."""

    def __init__(self, raw: BinaryIO, cap: int, captured: Captured) -> None:
        self.raw = raw
        self.cap = cap
        self.captured = captured
        self.parts: list[bytes] = []
        self.kept = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(READ_CHUNK if size < 0 else min(size, READ_CHUNK))
        if chunk:
            self.captured.size += len(chunk)
            room = self.cap - self.kept
            if room > 0:
                self.parts.append(chunk[:room])
                self.kept += min(room, len(chunk))
        return chunk


def _capture(cas: LocalCAS, raw: BinaryIO, cap: int, captured: Captured) -> None:
    """Store one stream; a failure (say, a full disk) is kept for the caller.

    The pipe is closed either way, so a child still writing gets EPIPE instead
    of blocking; :func:`run_process` raises the failure once the run is over.
    """
    reader = _PreviewReader(raw, cap, captured)
    try:
        captured.digest = cas.put_stream(reader, durable=False)  # type: ignore[arg-type]
    except BaseException as exc:  # noqa: BLE001 - handed to run_process, not lost
        captured.failure = exc
    finally:
        raw.close()
    captured.preview = b"".join(reader.parts)
    captured.truncated = captured.size > cap


def _await_exit(pid: int, exited: threading.Event) -> None:
    """Set ``exited`` when ``pid`` ends, leaving it a zombie (not reaped).

    While the zombie is there its PID cannot be given to another process, so the
    leftover scan can match the run's process group and session by that number
    without hitting a stranger.
    """
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    exited.set()


def run_process(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout_ms: int,
    cas: LocalCAS,
    preview_bytes: int,
    marker: str | None,
    isolated: bool,
) -> Completed:
    """Run ``argv`` to completion or timeout; never raises for the child's sake.

    ``isolated`` says ``argv`` starts bubblewrap with a PID namespace, which takes
    every process of the run with it; otherwise leftovers are found in ``/proc``
    (see :func:`kill_tree`, ``marker``).
    """
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
            umask=0o022,
        )
    except OSError as exc:
        empty = cas.put_bytes(b"", durable=False)
        return Completed(
            exit_code=127,
            termination_reason="spawn_failed",
            stdout=Captured(digest=empty),
            stderr=Captured(digest=empty),
            duration_ms=int((time.monotonic() - start) * 1000),
            spawn_error=spawn_reason(exc),
        )

    streams = (Captured(), Captured())
    readers = [
        threading.Thread(
            target=_capture, args=(cas, pipe, preview_bytes, captured), daemon=True
        )
        for pipe, captured in zip((proc.stdout, proc.stderr), streams, strict=True)
    ]
    for reader in readers:
        reader.start()
    exited = threading.Event()
    threading.Thread(target=_await_exit, args=(proc.pid, exited), daemon=True).start()

    timed_out = not exited.wait(timeout_ms / 1000)
    killed = 0
    if isolated:
        # bwrap's PID namespace dies with it (--die-with-parent): nothing to scan.
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        exited.wait()
    else:
        if timed_out:
            kill_tree(proc.pid, marker)
        exited.wait()
        killed = kill_tree(proc.pid, marker)
    killed += _drain(readers, proc.pid, marker)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    duration_ms = int((time.monotonic() - start) * 1000)
    _raise_capture_failure(streams)

    if timed_out:
        exit_code, reason = 124, "timeout"
    elif proc.returncode < 0:
        exit_code, reason = 128 - proc.returncode, "exited"
    else:
        exit_code, reason = proc.returncode, "exited"
    return Completed(
        exit_code=exit_code,
        termination_reason=reason,
        stdout=streams[0],
        stderr=streams[1],
        duration_ms=duration_ms,
        peak_memory_bytes=usage.ru_maxrss * 1024,
        killed_leftovers=killed,
    )


def _raise_capture_failure(streams: tuple[Captured, Captured]) -> None:
    """StorageFailed when a stream could not be stored; the run has no result."""
    for name, captured in zip(("stdout", "stderr"), streams, strict=True):
        failure = captured.failure
        if failure is None:
            continue
        if isinstance(failure, OSError):
            why = failure.strerror or type(failure).__name__
            msg = f"the CAS could not store the run's {name}: {why}"
            raise StorageFailed(msg, stream=name, errno=failure.errno) from failure
        raise failure


def _drain(readers: list[threading.Thread], pid: int, marker: str | None) -> int:
    """Wait for both streams to end, killing any holder of the pipes that appears."""
    killed = 0
    for _ in range(KILL_ROUNDS):
        for reader in readers:
            reader.join(DRAIN_WAIT_S)
        if not any(reader.is_alive() for reader in readers):
            return killed
        killed += kill_tree(pid, marker)
    _log.warning("engine.stream_not_closed", pid=pid)
    return killed


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, session) of a live ``pid``; None if gone or dead.

    Zombies count as gone: they hold no pipe and run no code, and in a container
    whose init does not reap they would otherwise be "killed" forever.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            text = stream.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def _carries_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            return marker in stream.read().split(b"\0")
    except OSError:
        return False


def descendants(root: int, marker: str | None) -> set[int]:
    """Live processes that belong to the run started as ``root``."""
    me = os.getpid()
    table: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            stat = _proc_stat(int(name))
            if stat is not None:
                table[int(name)] = stat

    found = {
        pid
        for pid, (_, group, session) in table.items()
        if group == root or session == root
    }
    if root in table:
        found.add(root)
    grew = True
    while grew:
        grew = False
        for pid, (parent, _, _) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    if marker is not None:
        marker_bytes = marker.encode()
        for pid in table:
            if pid not in found and _carries_marker(pid, marker_bytes):
                found.add(pid)
    return found


def kill_tree(root: int, marker: str | None) -> int:
    """SIGKILL every process of the run until none is left; how many were hit.

    ``marker`` is an ``NAME=value`` environment entry unique to this run, or None
    when the run has no such entry (under bubblewrap every run's HOME is the same).
    """
    hit: set[int] = set()
    unkillable: set[int] = set()
    for _ in range(KILL_ROUNDS):
        victims = descendants(root, marker) - unkillable
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                unkillable.add(pid)
                continue
            hit.add(pid)
        time.sleep(0.005)
    hit.discard(root)
    return len(hit)


def spawn_reason(exc: OSError) -> str:
    """A stable word for why exec failed (the same on every machine)."""
    if exc.errno == errno.ENOENT:
        return "not_found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not_executable"
    return errno.errorcode.get(exc.errno or 0, "os_error").lower()
