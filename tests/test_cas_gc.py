"""CAS garbage collection: the root walk, the grace period, pins and temp files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from requiem.cas import gc
from requiem.cas.store import LocalCAS

HOUR = 3600.0


@pytest.fixture
def cas(tmp_path: Path) -> LocalCAS:
    store = LocalCAS(tmp_path / "cas")
    store.ensure()
    return store


def _json_blob(cas: LocalCAS, document: object) -> str:
    return cas.put_bytes(json.dumps(document).encode())


def _action_entry(cas: LocalCAS, key: str, result_blob: str) -> None:
    path = cas.action_cache / key[:2] / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result_blob": result_blob}))


def _stored_result(cas: LocalCAS) -> dict[str, str]:
    """A result whose request blob names inputs, as the engine stores them."""
    names = ["stdout", "stderr", "output", "input", "nested_output", "unfollowed"]
    digests = {name: cas.put_bytes(name.encode() * 10) for name in names}
    inner_result = _json_blob(
        cas, {"kind": "requiem.result", "outputs": [digests["nested_output"]]}
    )
    plain_json = _json_blob(cas, {"note": digests["unfollowed"]})
    request = _json_blob(
        cas,
        {
            "kind": "requiem.request",
            "inputs": {"src/a.c": digests["input"]},
            "previous": inner_result,
        },
    )
    result = _json_blob(
        cas,
        {
            "kind": "requiem.result",
            "request_blob": request,
            "stdout_digest": digests["stdout"],
            "stderr_digest": digests["stderr"],
            "output_digests": {"out/a.o": digests["output"]},
            "attachments": [plain_json],
        },
    )
    _action_entry(cas, "a" * 64, result)
    return {
        **digests,
        "inner_result": inner_result,
        "plain_json": plain_json,
        "request": request,
        "result": result,
    }


def test_walk_follows_results_and_requests(cas: LocalCAS) -> None:
    """Every hex string of a result, and of requests/results it names, is a root."""
    stored = _stored_result(cas)

    walk = gc.walk_roots(cas)

    kept = set(stored) - {"unfollowed"}
    assert walk.referenced == {stored[name] for name in kept}
    assert walk.action_entries == 1
    assert walk.problems == []


def test_walk_reports_broken_roots(cas: LocalCAS) -> None:
    (cas.action_cache / "bb").mkdir(parents=True)
    (cas.action_cache / "bb" / ("b" * 64)).write_text("{oops")
    _action_entry(cas, "c" * 64, "d" * 64)

    walk = gc.walk_roots(cas)

    assert sorted(p["problem"] for p in walk.problems) == [
        "action_cache_entry_unreadable",
        "referenced_object_missing",
    ]
    assert walk.referenced == {"d" * 64}


def test_collect_removes_only_old_unreferenced_objects(cas: LocalCAS) -> None:
    stored = _stored_result(cas)
    pinned = cas.put_bytes(b"uploaded through the API")
    cas.pin(pinned, "upload:tenant-a")
    later = time.time() + 2 * HOUR

    report = gc.collect(cas, grace_s=HOUR, now=later)
    remaining = set(cas.iter_digests())

    assert report.removed == 1
    assert remaining == {d for n, d in stored.items() if n != "unfollowed"} | {pinned}
    assert report.referenced == len(remaining)
    assert report.pins == 1


def test_collect_keeps_objects_inside_the_grace_period(cas: LocalCAS) -> None:
    fresh = cas.put_bytes(b"written by an execution still running")

    report = gc.collect(cas, grace_s=HOUR)

    assert (report.young, report.removed) == (1, 0)
    assert cas.exists(fresh)


def test_a_put_of_a_stored_object_renews_it(cas: LocalCAS) -> None:
    """Deduplicating an old object protects it like writing a new one."""
    digest = cas.put_bytes(b"old but wanted again")
    long_ago = time.time() - 10 * HOUR
    for path in (cas.blob_path(digest), cas.meta_path(digest)):
        os.utime(path, (long_ago, long_ago))

    cas.put_bytes(b"old but wanted again")
    report = gc.collect(cas, grace_s=HOUR)

    assert report.removed == 0
    assert cas.exists(digest)


def test_dry_run_removes_nothing(cas: LocalCAS) -> None:
    digest = cas.put_bytes(b"garbage")
    stale_temp = cas.tmp / "put-1-1.tmp"
    stale_temp.write_bytes(b"half")

    report = gc.collect(cas, grace_s=0, dry_run=True, now=time.time() + HOUR)

    assert (report.removed, report.temp_removed) == (1, 1)
    assert report.removed_bytes > 0
    assert cas.exists(digest) and stale_temp.exists()


def test_stale_temp_files_go_fresh_ones_stay(cas: LocalCAS) -> None:
    stale, fresh = cas.tmp / "put-1-1.tmp", cas.tmp / "put-1-2.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    long_ago = time.time() - 2 * HOUR
    os.utime(stale, (long_ago, long_ago))

    report = gc.collect(cas, grace_s=HOUR)

    assert report.temp_removed == 1
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1w", 604800)]
    + [("0", 0), ("2.5", 2.5), (" 1H ", 3600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert gc.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "soon", "1y", "nan", "inf"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(gc.InvalidDuration) as caught:
        gc.parse_duration(text)

    assert (caught.value.code, caught.value.exit_code) == ("invalid_duration", 2)
