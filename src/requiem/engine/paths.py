"""Workspace-relative paths: the one check every cwd, input and output passes.

A request names files by paths relative to its workspace. Anything that could point
elsewhere — an absolute path, a ``..`` component, a NUL byte — is refused before a
file is touched; symlinks are checked against the real workspace when the files
exist (see :func:`inside`).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from requiem.engine.errors import InvalidRequest, PathEscape

MAX_PATH_CHARS = 4096


def clean_relpath(text: str, what: str, *, allow_dot: bool = False) -> str:
    """``text`` as a normalised relative POSIX path; PathEscape if it leaves the root.

    ``./a//b`` becomes ``a/b``. ``.`` (the workspace itself) is accepted only when
    ``allow_dot`` is set, as it is for ``cwd``.
    """
    if not isinstance(text, str) or not text or "\x00" in text:
        msg = f"{what} must be a non-empty path without NUL bytes"
        raise InvalidRequest(msg, field=what)
    if len(text) > MAX_PATH_CHARS:
        msg = f"{what} is longer than {MAX_PATH_CHARS} characters"
        raise InvalidRequest(msg, field=what)
    if text.startswith("/"):
        msg = f"{what} {text!r} is absolute; paths are relative to the workspace"
        raise PathEscape(msg, field=what, path=text)
    parts = [part for part in PurePosixPath(text).parts if part != "."]
    if ".." in parts:
        msg = f"{what} {text!r} contains '..'; paths must stay inside the workspace"
        raise PathEscape(msg, field=what, path=text)
    if not parts:
        if allow_dot:
            return "."
        msg = f"{what} {text!r} names the workspace itself, not a file"
        raise InvalidRequest(msg, field=what, path=text)
    return "/".join(parts)


def inside(root: Path, relpath: str) -> Path:
    """The real path of ``root/relpath``; PathEscape if a symlink leads outside root.

    The file need not exist: the part that exists is resolved, so a symlinked
    directory anywhere along the way is caught.
    """
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root / relpath))
    if target != real_root and real_root not in target.parents:
        msg = f"path {relpath!r} leads outside the workspace through a symlink"
        raise PathEscape(msg, path=relpath)
    return target
