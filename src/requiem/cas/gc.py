"""Garbage collection of the CAS: find what stored results reference, drop the rest.

Roots, as the engine writes them:

* the action cache, ``<root>/v2/ac/<k[:2]>/<k>``, each file JSON
  ``{"result_blob": "<digest>"}`` naming a result stored in the CAS;
* explicit pins (:meth:`LocalCAS.pin`), which the service uses for what its database
  references.

A result blob references every 64-hex string found anywhere in its JSON (the request
blob, stdout, stderr, outputs, inputs). A referenced blob that is itself JSON with
``"kind": "requiem.request"`` or ``"kind": "requiem.result"`` is followed the same way,
so the walk reaches everything a stored result needs to be replayed and verified.

Collection never removes an object used more recently than the grace period (a put of
an object already stored renews it), so an execution in flight, whose result is not
yet in the action cache, keeps what it has written or deduplicated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from requiem import digest as dg
from requiem.cas.store import CasIntegrityFailed, CasObjectMissing, LocalCAS
from requiem.errors import InvalidInput

FOLLOWED_KINDS = ("requiem.request", "requiem.result")
MAX_SCANNED_JSON = 16 << 20  # larger referenced blobs are kept but not parsed
DEFAULT_GRACE_S = 3600.0
TEMP_STALE_S = 600.0  # writers touch their temp file with every chunk they write
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class InvalidDuration(InvalidInput):
    code = "invalid_duration"


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``1h``, ``2d``, ``1w`` or a bare number."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not number or seconds < 0 or seconds != seconds or seconds == float("inf"):
        msg = f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 2d)"
        raise InvalidDuration(msg, value=text)
    return seconds


@dataclass
class RootWalk:
    """What the roots keep alive, and anything odd met on the way."""

    referenced: set[str] = field(default_factory=set)
    action_entries: int = 0
    pins: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)


def hex_strings(value: Any) -> Iterator[str]:
    """Every 64-hex string in a parsed JSON value, keys included, depth-first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if dg.is_digest(item):
                yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _iter_action_entries(cas: LocalCAS) -> Iterator[Path]:
    if not cas.action_cache.is_dir():
        return
    for folder in sorted(os.scandir(cas.action_cache), key=lambda e: e.name):
        if folder.is_dir():
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                if entry.is_file() and not entry.name.endswith(".tmp"):
                    yield Path(entry.path)


def _load_json_object(cas: LocalCAS, digest: str, walk: RootWalk) -> Any:
    """The parsed JSON of a small stored object, or None if it is not JSON."""
    try:
        if cas.meta(digest).size > MAX_SCANNED_JSON:
            return None
        raw = cas.get_bytes(digest)
    except CasObjectMissing:
        walk.problems.append({"digest": digest, "problem": "referenced_object_missing"})
        return None
    except CasIntegrityFailed as exc:
        reason = str(exc.details.get("reason", "cas_integrity_failed"))
        walk.problems.append({"digest": digest, "problem": reason})
        return None
    if raw.lstrip()[:1] != b"{":
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def walk_roots(cas: LocalCAS) -> RootWalk:
    """Every digest the action cache and the pins keep alive.

    A pinned result (the engine pins every result it hands out) keeps what it
    references, like a cached one.
    """
    walk = RootWalk()
    pinned: list[str] = []  # followed when they are results or requests
    for pin in cas.iter_pins():
        walk.pins += 1
        walk.referenced.add(pin.digest)
        pinned.append(pin.digest)

    pending: list[str] = []  # result blobs: followed whatever their kind
    for entry in _iter_action_entries(cas):
        try:
            result_blob = json.loads(entry.read_bytes())["result_blob"]
        except (OSError, ValueError, KeyError, TypeError):
            result_blob = None
        if not dg.is_digest(result_blob):
            walk.problems.append(
                {"path": str(entry), "problem": "action_cache_entry_unreadable"}
            )
            continue
        walk.action_entries += 1
        walk.referenced.add(result_blob)
        pending.append(result_blob)

    followed: set[str] = set()
    candidates: list[str] = pinned
    while pending or candidates:
        if pending:
            digest, is_root = pending.pop(), True
        else:
            digest, is_root = candidates.pop(), False
        if digest in followed:
            continue
        followed.add(digest)
        document = _load_json_object(cas, digest, walk)
        if not isinstance(document, dict):
            continue
        if not is_root and document.get("kind") not in FOLLOWED_KINDS:
            continue
        for ref in hex_strings(document):
            walk.referenced.add(ref)
            if ref not in followed:
                candidates.append(ref)
    return walk


@dataclass
class GcReport:
    dry_run: bool
    grace_s: float
    examined: int = 0
    referenced: int = 0
    young: int = 0
    removed: int = 0
    removed_bytes: int = 0
    temp_removed: int = 0
    action_entries: int = 0
    pins: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _stored_bytes(cas: LocalCAS, digest: str) -> int:
    total = 0
    for path in (cas.blob_path(digest), cas.meta_path(digest)):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def collect(
    cas: LocalCAS,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Remove unreferenced objects older than ``grace_s`` and stale temp files."""
    report = GcReport(dry_run=dry_run, grace_s=grace_s)
    walk = walk_roots(cas)
    report.action_entries, report.pins = walk.action_entries, walk.pins
    report.problems = walk.problems
    # Anything touched after this instant (measured before the sweep starts) is young.
    cutoff = (time.time() if now is None else now) - grace_s

    for digest in cas.iter_digests():
        report.examined += 1
        if digest in walk.referenced:
            report.referenced += 1
            continue
        last_used = cas.last_used(digest)
        if last_used is None:
            continue  # removed by someone else meanwhile
        if last_used > cutoff:
            report.young += 1
            continue
        report.removed += 1
        report.removed_bytes += _stored_bytes(cas, digest)
        if not dry_run:
            cas.remove(digest)

    temp_cutoff = (time.time() if now is None else now) - min(grace_s, TEMP_STALE_S)
    for path, mtime in cas.iter_temp_files():
        if mtime <= temp_cutoff:
            report.temp_removed += 1
            if not dry_run:
                path.unlink(missing_ok=True)
    return report
