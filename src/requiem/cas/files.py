"""Durability primitives the CAS builds on: directory fsync and filesystem sync."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from pathlib import Path

# NOTE: Python exposes sync() but not syncfs(); syncfs flushes only the filesystem
# that holds the CAS, which is what a batch's durability barrier needs.
# renameat2(RENAME_NOREPLACE) moves a file in only if the name is free, in one
# system call; link + unlink does the same in two where the C library lacks it.
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (renames, new names) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Make the data of the file at ``path`` durable (cheap when it already is)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: str | Path) -> None:
    """Flush the filesystem holding ``path`` (syncfs on Linux, sync elsewhere)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def move_no_replace(source: str, target: str) -> None:
    """Rename ``source`` to ``target``; FileExistsError if ``target`` exists."""
    if _renameat2 is not None:
        if (
            _renameat2(
                _AT_FDCWD,
                source.encode(),
                _AT_FDCWD,
                target.encode(),
                _RENAME_NOREPLACE,
            )
            == 0
        ):
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # unsupported by this filesystem
            raise OSError(err, os.strerror(err), target)
    os.link(source, target)
    os.unlink(source)


def write_atomically(target: Path, body: bytes) -> None:
    """Replace ``target`` with ``body`` durably: temp file, fsync, rename, fsync dir."""
    # A random part as well as the pid: two threads of one process writing the same
    # target must not share (and truncate) one temp file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)
