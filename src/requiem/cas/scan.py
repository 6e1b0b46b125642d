"""Whole-store walks: verify (all or a random sample), stats, and the export manifest.

Each walk streams the directory tree and holds at most one object at a time (plus,
for a sample, the sample itself), so it runs in constant memory whatever the size of
the store.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

from requiem.cas.gc import TEMP_STALE_S
from requiem.cas.store import CasIntegrityFailed, CasObjectMissing, LocalCAS

REASONS = (
    "missing_blob",
    "missing_metadata",
    "metadata_unreadable",
    "stored_hash_mismatch",
    "content_digest_mismatch",
    "orphan_temp_file",
)
EXPORT_FORMAT = "requiem.cas.export/1"
WORKERS = 4
WINDOW = 512


@dataclass
class VerifyReport:
    mode: str  # "all" or "sample"
    objects: int = 0  # objects on disk when the walk ran
    checked: int = 0
    good: int = 0
    temp_files: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "objects": self.objects,
            "checked": self.checked,
            "good": self.good,
            "bad_count": len(self.bad),
            "temp_files": self.temp_files,
            "bad": self.bad,
        }


def count_objects(cas: LocalCAS) -> int:
    return sum(1 for _ in cas.iter_digests())


def sample_digests(
    cas: LocalCAS, size: int, rng: random.Random | None = None
) -> tuple[list[str], int]:
    """A uniform random sample of ``size`` digests (reservoir), and the total count."""
    rng = rng or random.SystemRandom()
    reservoir: list[str] = []
    total = 0
    for total, digest in enumerate(cas.iter_digests(), start=1):
        if len(reservoir) < size:
            reservoir.append(digest)
        else:
            slot = rng.randrange(total)
            if slot < size:
                reservoir[slot] = digest
    return sorted(reservoir), total


def _problems(
    cas: LocalCAS, digests: Iterable[str]
) -> Iterator[tuple[str, str | None]]:
    """``(digest, problem)`` in order; checks overlap on threads, a window at a time.

    Reading and hashing release the GIL, so a few threads keep the disk and the
    cores busy; the window bounds how many digests are held at once.
    """

    def check_slice(part: list[str]) -> list[str | None]:
        return [cas.problem(digest) for digest in part]

    step = WINDOW // WORKERS  # one task per slice: a future per object costs more
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        while window := list(itertools.islice(digests, WINDOW)):
            slices = [window[i : i + step] for i in range(0, len(window), step)]
            found = itertools.chain.from_iterable(pool.map(check_slice, slices))
            yield from zip(window, found, strict=True)


def verify(
    cas: LocalCAS,
    *,
    sample: int | None = None,
    advance: Callable[[], None] | None = None,
    now: float | None = None,
) -> VerifyReport:
    """Check every object (``sample=None``) or a random ``sample`` of them.

    Temp files untouched for longer than ``TEMP_STALE_S`` are reported as
    ``orphan_temp_file``: a live writer touches its temp file with every chunk.
    ``advance`` is called once per object checked (a progress bar's hook).
    """
    report = VerifyReport(mode="all" if sample is None else "sample")
    if sample is None:
        digests = cas.iter_digests()
    else:
        chosen, report.objects = sample_digests(cas, sample)
        digests = iter(chosen)

    for digest, reason in _problems(cas, digests):
        if reason == "gone":
            continue
        report.checked += 1
        if reason is None:
            report.good += 1
        else:
            report.bad.append({"digest": digest, "reason": reason})
        if advance is not None:
            advance()
    if sample is None:
        report.objects = report.checked

    stale_before = (time.time() if now is None else now) - TEMP_STALE_S
    for path, mtime in cas.iter_temp_files():
        report.temp_files += 1
        if mtime <= stale_before:
            report.bad.append({"path": str(path), "reason": "orphan_temp_file"})
    return report


@dataclass
class EncodingTotals:
    objects: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0


def stats(cas: LocalCAS) -> dict[str, Any]:
    """Object count, logical and stored bytes, ratio, split by encoding."""
    by_encoding: dict[str, EncodingTotals] = {}
    unreadable = 0
    for digest in cas.iter_digests():
        try:
            meta = cas.meta(digest)
        except (CasObjectMissing, CasIntegrityFailed):
            unreadable += 1
            continue
        totals = by_encoding.setdefault(meta.encoding, EncodingTotals())
        totals.objects += 1
        totals.logical_bytes += meta.size
        totals.stored_bytes += meta.stored_size
    logical = sum(t.logical_bytes for t in by_encoding.values())
    stored = sum(t.stored_bytes for t in by_encoding.values())
    return {
        "root": str(cas.root),
        "objects": sum(t.objects for t in by_encoding.values()),
        "logical_bytes": logical,
        "stored_bytes": stored,
        "compression_ratio": round(logical / stored, 3) if stored else 1.0,
        "by_encoding": {
            name: dict(totals.__dict__) for name, totals in sorted(by_encoding.items())
        },
        "incomplete_or_unreadable": unreadable,
        "temp_files": sum(1 for _ in cas.iter_temp_files()),
    }


def export_manifest(cas: LocalCAS, out: TextIO) -> int:
    """Write the JSON manifest of every object to ``out``, one object at a time.

    Each entry is the object's sidecar; an object whose sidecar is missing or
    unreadable appears with its digest and a ``problem``. Returns the count.
    """
    out.write(
        f'{{"format": "{EXPORT_FORMAT}", '
        f'"root": {json.dumps(str(cas.root))}, "objects": ['
    )
    count = problems = 0
    for digest in cas.iter_digests():
        try:
            entry: dict[str, Any] = dict(cas.meta(digest).__dict__)
        except CasObjectMissing:
            entry = {"digest": digest, "problem": _missing_part(cas, digest)}
        except CasIntegrityFailed as exc:
            entry = {"digest": digest, "problem": str(exc.details["reason"])}
        problems += "problem" in entry
        out.write(("\n" if count == 0 else ",\n") + json.dumps(entry, sort_keys=True))
        count += 1
    out.write(f'\n], "count": {count}, "problems": {problems}}}\n')
    return count


def _missing_part(cas: LocalCAS, digest: str) -> str:
    return "missing_blob" if cas.meta_path(digest).exists() else "missing_metadata"
