"""Workspaces: snapshot a host directory into the CAS, rebuild it, collect outputs.

A run never sees the caller's directory. Its inputs (relative path → digest) are
materialised into a fresh scratch directory whose host path depends only on the
request digest, so a program that prints its working directory prints the same
thing for every caller. File modes and times are not part of a snapshot: every
materialised file and directory gets mtime ``SOURCE_DATE_EPOCH``, and a file is
executable (0755) exactly when its content starts with ``#!`` or is an ELF image,
otherwise 0644 — a function of the bytes, so the digests stand for the files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from requiem.cas.store import CasObjectMissing, LocalCAS
from requiem.engine.errors import (
    InvalidRequest,
    MissingInput,
    OutputNotWritable,
    PathEscape,
)
from requiem.engine.paths import clean_relpath, inside
from requiem.errors import ConfigError

SKIPPED_NAMES = frozenset({".requiem", ".git", ".venv"})
EXECUTABLE_MAGIC = (b"#!", b"\x7fELF")
MAX_SNAPSHOT_FILES = 100_000
# All declared outputs of one run together; a fixed number, so every machine
# gives the same result for the same run.
MAX_OUTPUT_BYTES = 4 << 30


def snapshot(
    cas: LocalCAS,
    directory: str | Path,
    *,
    skip: frozenset[str] = SKIPPED_NAMES,
    skip_dirs: tuple[Path, ...] = (),
) -> dict[str, str]:
    """Store every regular file under ``directory``; relative path → digest.

    Directories named in ``skip`` are left out at any depth, as are the CAS itself
    and each of ``skip_dirs`` (say, the state directory) when they live inside
    ``directory``. A symlink is followed when it stays inside the directory and
    refused (PathEscape) when it leads outside.
    """
    root = Path(os.path.realpath(directory))
    if not root.is_dir():
        msg = f"workspace {directory} is not a directory"
        raise InvalidRequest(msg, field="workspace_root")
    left_out = {Path(os.path.realpath(p)) for p in (cas.root, *skip_dirs)}
    cas_root = Path(os.path.realpath(cas.root))
    for place in left_out:
        if root == place or (place == cas_root and place in root.parents):
            msg = (
                f"workspace {directory} lies in {place}, which holds Requiem's own "
                "state (CAS, database, keys or scratch runs); use a project directory"
            )
            raise InvalidRequest(msg, field="workspace_root")

    found: dict[str, str] = {}
    for current, dirnames, filenames in os.walk(root):
        here = Path(current)
        dirnames[:] = sorted(
            name
            for name in dirnames
            if name not in skip
            and here / name not in left_out
            and not _skip_linked_dir(root, here / name)
        )
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            _utf8_name(rel)
            if path.is_symlink():
                target = inside(root, rel)
                if not target.is_file():
                    continue
                path = target
            elif not path.is_file():
                continue
            digest = put_regular_file(cas, path)
            if digest is None:
                continue  # replaced by a symlink or special file since listed
            found[rel] = digest
            if len(found) > MAX_SNAPSHOT_FILES:
                msg = f"workspace has more than {MAX_SNAPSHOT_FILES} files"
                raise InvalidRequest(msg, field="workspace_root")
    cas.sync()
    return found


def put_regular_file(cas: LocalCAS, path: Path) -> str | None:
    """Store ``path`` if it is still a regular file when opened, else None.

    The checks before this call look at the path; between them and the read, a
    co-writer of the directory could swap in a symlink to a host file or a FIFO.
    Opening without following a final symlink and without blocking, then
    checking the open file itself, closes that window for the last component.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as stream:
        return cas.put_stream(stream, durable=False)


def _utf8_name(rel: str) -> None:
    """InvalidRequest for a file name that is not UTF-8 (it cannot be digested)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        msg = f"workspace file name {shown!r} is not valid UTF-8; rename it"
        raise InvalidRequest(msg, field="workspace_root") from None


def _skip_linked_dir(root: Path, path: Path) -> bool:
    """Symlinked directories are not descended (their target is walked anyway)."""
    if not path.is_symlink():
        return False
    inside(root, path.relative_to(root).as_posix())
    return True


def executable(first_bytes: bytes) -> bool:
    return first_bytes.startswith(EXECUTABLE_MAGIC)


def materialise(
    cas: LocalCAS, inputs: dict[str, str], workspace: Path, epoch: int
) -> None:
    """Write each input into ``workspace`` with fixed modes and times."""
    missing = [digest for digest in inputs.values() if not cas.exists(digest)]
    if missing:
        path = next(p for p, d in inputs.items() if d == missing[0])
        msg = f"input {path!r} names {missing[0]}, which is not in the CAS"
        raise MissingInput(msg, path=path, digest=missing[0])

    directories = {workspace}
    for rel, digest in sorted(inputs.items()):
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent
        while parent != workspace:
            directories.add(parent)
            parent = parent.parent
        try:
            cas.get_to_file(digest, target)
        except CasObjectMissing as exc:
            msg = f"input {rel!r} names {digest}, which is not in the CAS"
            raise MissingInput(msg, path=rel, digest=digest) from exc
        with open(target, "rb") as stream:
            mode = 0o755 if executable(stream.read(4)) else 0o644
        os.chmod(target, mode)
        os.utime(target, (epoch, epoch))
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        os.chmod(directory, 0o755)
        os.utime(directory, (epoch, epoch))


@dataclass(frozen=True)
class Scratch:
    """One run's private directories on the host.

    ``tmp`` is created only for runs outside the sandbox (inside, ``/tmp`` is a
    fresh tmpfs); ``base`` is the work directory that holds every scratch.
    """

    base: Path
    root: Path
    workspace: Path
    tmp: Path


@contextmanager
def scratch(base: Path, key: str) -> Iterator[Scratch]:
    """``base/key`` created empty, held under an exclusive lock, removed after.

    Two runs of the same request share the path (that is what makes it
    deterministic), so the lock makes the second wait for the first.
    """
    _own_private_dir(base)
    lock_path = base / f"{key}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        root = base / key
        shutil.rmtree(root, ignore_errors=True)
        place = Scratch(base, root, root / "ws", root / "tmp")
        place.workspace.mkdir(parents=True)
        try:
            yield place
        finally:
            _remove_tree(root)


def _own_private_dir(base: Path) -> None:
    """Create ``base`` (0700) or check that it is ours and not writable by others.

    The default lives under /tmp, where another user could create it first and
    plant symlinks; a directory we do not own is refused rather than used.
    """
    try:
        base.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        msg = f"work directory {base} is not a directory owned by this user"
        raise ConfigError(msg, setting="REQUIEM_WORK_DIR")
    if info.st_mode & 0o022:
        msg = f"work directory {base} is writable by other users"
        raise ConfigError(msg, setting="REQUIEM_WORK_DIR")


def _remove_tree(root: Path) -> None:
    """Remove a scratch tree even where the child left read-only directories."""

    def make_writable(_func: object, path: str, _exc: object) -> None:
        parent = os.path.dirname(path)
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)

    shutil.rmtree(root, onerror=make_writable)


@dataclass(frozen=True)
class OutputProblem:
    path: str
    reason: str  # absent, not_a_file, path_escape, too_large


def capture_outputs(
    cas: LocalCAS, workspace: Path, outputs: list[str]
) -> tuple[dict[str, str], list[OutputProblem]]:
    """Store each declared output file; the missing ones come back as problems."""
    digests: dict[str, str] = {}
    problems: list[OutputProblem] = []
    total = 0
    for rel in outputs:
        try:
            real = inside(workspace, rel)
        except PathEscape:
            problems.append(OutputProblem(rel, "path_escape"))
            continue
        if not os.path.lexists(workspace / rel):
            problems.append(OutputProblem(rel, "absent"))
        elif not real.is_file():
            problems.append(OutputProblem(rel, "not_a_file"))
        elif total + real.stat().st_size > MAX_OUTPUT_BYTES:
            # A sparse file costs the child nothing and us hours: never read it.
            problems.append(OutputProblem(rel, "too_large"))
        else:
            total += real.stat().st_size
            digest = put_regular_file(cas, real)
            if digest is None:
                problems.append(OutputProblem(rel, "not_a_file"))
            else:
                digests[rel] = digest
    return digests, problems


def copy_outputs_back(
    cas: LocalCAS, outputs: dict[str, str], directory: Path
) -> list[Path]:
    """Write each captured output into ``directory`` (the caller's workspace).

    Modes follow the inputs' rule: programs (ELF, ``#!``) 0755, everything else 0644,
    so a binary built in the sandbox runs where it lands.
    """
    written = []
    for rel, digest in sorted(outputs.items()):
        target = inside(directory, clean_relpath(rel, "outputs"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            cas.get_to_file(digest, target)
            with open(target, "rb") as stream:
                os.chmod(target, 0o755 if executable(stream.read(4)) else 0o644)
        except OSError as exc:
            msg = f"cannot copy output {rel!r} back into {directory}: {exc.strerror}"
            raise OutputNotWritable(msg, path=rel) from exc
        written.append(target)
    return written
