"""Explicit GC roots: one small file per (digest, reason) under ``v2/pins/``.

A pin file is named ``<digest>.<first 16 hex of BLAKE3(reason)>`` inside a folder
named by the digest's first two characters, and holds JSON with the digest, the
reason and when it was made. One file per reason lets several owners pin the same
object without coordinating, and a plain file copy carries the pins along.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from requiem import digest as dg
from requiem.cas.files import write_atomically

UNREADABLE = "(unreadable pin file)"


@dataclass(frozen=True)
class Pin:
    digest: str
    reason: str
    created: str


def pin_path(pins_dir: Path, digest: str, reason: str) -> Path:
    reason_key = dg.of_bytes(reason.encode())[:16]
    return pins_dir / digest[:2] / f"{digest}.{reason_key}"


def add(pins_dir: Path, digest: str, reason: str) -> None:
    """Write the pin durably unless it is already there."""
    target = pin_path(pins_dir, digest, reason)
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {"digest": digest, "reason": reason, "created": created}
    write_atomically(target, json.dumps(body, sort_keys=True).encode())


def remove(pins_dir: Path, digest: str, reason: str | None) -> int:
    """Drop the pin for ``reason``, or every pin of ``digest``; how many went."""
    if reason is not None:
        paths = [pin_path(pins_dir, digest, reason)]
    else:
        folder = pins_dir / digest[:2]
        paths = list(folder.glob(f"{digest}.*")) if folder.is_dir() else []
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def iter_all(pins_dir: Path) -> Iterator[Pin]:
    """Every pin; an unreadable pin file still pins the digest in its name."""
    if not pins_dir.is_dir():
        return
    for folder in sorted(os.scandir(pins_dir), key=lambda e: e.name):
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
            digest = entry.name.split(".", 1)[0]
            if not dg.is_digest(digest):
                continue  # a pin being written (".<name>.….tmp") or a stray file
            try:
                with open(entry.path, "rb") as pin_file:
                    fields = json.loads(pin_file.read())
                yield Pin(digest, str(fields["reason"]), str(fields["created"]))
            except (OSError, ValueError, KeyError, TypeError):
                yield Pin(digest, UNREADABLE, "")
