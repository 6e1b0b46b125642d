"""The local CAS: layout, encodings, atomic writes, checks on every read."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from requiem import digest as dg
from requiem.cas.store import (
    CasIntegrityFailed,
    CasObjectMissing,
    InvalidDigest,
    LocalCAS,
)

SMALL = b"hello, requiem\n"
TEXT = b"the same line again and again\n" * 4000  # compresses well
NOISE = os.urandom(3 << 20)  # larger than one streaming chunk, incompressible


@pytest.fixture
def cas(tmp_path: Path) -> LocalCAS:
    return LocalCAS(tmp_path / "cas")


def _flip_byte(path: Path, offset: int) -> None:
    damaged = bytearray(path.read_bytes())
    damaged[offset] ^= 0x01
    path.write_bytes(bytes(damaged))


@pytest.mark.parametrize("mode", ["auto", "zstd", "none"])
@pytest.mark.parametrize("payload", [b"", SMALL, TEXT, NOISE], ids=len)
def test_round_trip_in_every_mode(tmp_path: Path, mode: str, payload: bytes) -> None:
    """put_bytes, put_stream and all three reads agree with plain BLAKE3."""
    store = LocalCAS(tmp_path / "cas", compression=mode)

    by_bytes = store.put_bytes(payload)
    by_stream = store.put_stream(io.BytesIO(payload))
    copy = io.BytesIO()
    store.get_to_stream(by_bytes, copy)
    store.get_to_file(by_bytes, tmp_path / "out")

    assert by_bytes == by_stream == dg.of_bytes(payload)
    assert store.get_bytes(by_bytes) == payload
    assert copy.getvalue() == payload
    assert (tmp_path / "out").read_bytes() == payload


def test_layout_and_sidecar(cas: LocalCAS) -> None:
    """Objects live at v2/objects/ab/cd/<digest> with a JSON sidecar beside them."""
    digest = cas.put_bytes(TEXT)

    blob = cas.root / "v2" / "objects" / digest[:2] / digest[2:4] / digest
    sidecar = json.loads(Path(f"{blob}.meta.json").read_bytes())

    assert blob.is_file()
    assert sidecar["digest"] == digest
    assert sidecar["encoding"] == "zstd"
    assert sidecar["size"] == len(TEXT)
    assert sidecar["stored_size"] == blob.stat().st_size < len(TEXT)
    assert sidecar["stored_blake3"] == dg.of_file(blob)
    assert sidecar["created"].endswith("Z")
    assert list((cas.root / "v2" / "tmp").iterdir()) == []


def test_auto_keeps_incompressible_bytes_raw(cas: LocalCAS) -> None:
    digest = cas.put_bytes(NOISE)

    assert cas.meta(digest).encoding == "identity"
    assert cas.meta(digest).stored_blake3 == digest


@pytest.mark.parametrize(
    ("payload", "offset", "reason"),
    [
        (SMALL, 3, "stored_hash_mismatch"),
        (TEXT, 5, "stored_hash_mismatch"),
        (NOISE, len(NOISE) // 2, "stored_hash_mismatch"),
    ],
    ids=["small-raw", "zstd", "large-raw"],
)
def test_a_flipped_bit_is_never_served(
    cas: LocalCAS, tmp_path: Path, payload: bytes, offset: int, reason: str
) -> None:
    """Every read path refuses a damaged blob and writes nothing."""
    digest = cas.put_bytes(payload)
    _flip_byte(cas.blob_path(digest), offset)
    sink = io.BytesIO()

    for read in (
        lambda: cas.get_bytes(digest),
        lambda: cas.get_to_stream(digest, sink),
        lambda: cas.get_to_file(digest, tmp_path / "out"),
        lambda: cas.verify_object(digest),
    ):
        with pytest.raises(CasIntegrityFailed) as caught:
            read()
        assert caught.value.code == "cas_integrity_failed"
        assert caught.value.details["reason"] == reason
    assert sink.getvalue() == b""
    assert not (tmp_path / "out").exists()
    assert cas.problem(digest) == reason


def test_consistent_lie_is_a_content_mismatch(cas: LocalCAS) -> None:
    """Blob and sidecar rewritten to agree with each other, not with the digest."""
    digest = cas.put_bytes(SMALL)
    forged = b"not what was stored"
    cas.blob_path(digest).write_bytes(forged)
    meta = json.loads(cas.meta_path(digest).read_bytes())
    meta.update(stored_blake3=dg.of_bytes(forged), stored_size=len(forged))
    cas.meta_path(digest).write_text(json.dumps(meta))

    with pytest.raises(CasIntegrityFailed) as caught:
        cas.get_bytes(digest)

    assert caught.value.details["reason"] == "content_digest_mismatch"
    assert cas.problem(digest) == "content_digest_mismatch"


def test_each_kind_of_damage_has_its_reason(cas: LocalCAS) -> None:
    no_blob, no_meta, garbled = (cas.put_bytes(b"%d" % n) for n in range(3))
    cas.blob_path(no_blob).unlink()
    cas.meta_path(no_meta).unlink()
    cas.meta_path(garbled).write_text("{not json")

    assert cas.problem(no_blob) == "missing_blob"
    assert cas.problem(no_meta) == "missing_metadata"
    assert cas.problem(garbled) == "metadata_unreadable"
    assert not cas.exists(no_blob) and not cas.exists(no_meta)
    with pytest.raises(CasObjectMissing):
        cas.get_bytes(no_meta)


def test_bad_and_unknown_digests(cas: LocalCAS) -> None:
    with pytest.raises(InvalidDigest) as bad:
        cas.get_bytes("ABC")
    with pytest.raises(CasObjectMissing) as missing:
        cas.get_bytes("0" * 64)

    assert (bad.value.code, bad.value.exit_code) == ("invalid_digest", 2)
    assert (missing.value.code, missing.value.exit_code) == ("cas_object_not_found", 3)


def test_put_heals_a_torn_blob(cas: LocalCAS) -> None:
    """A blob cut short (crash before the batch barrier) is rewritten by a put."""
    digest = cas.put_bytes(TEXT, durable=False)
    cas.blob_path(digest).write_bytes(b"")

    again = cas.put_bytes(TEXT)

    assert again == digest
    assert cas.get_bytes(digest) == TEXT


def test_put_completes_a_half_object(cas: LocalCAS) -> None:
    digest = cas.put_bytes(SMALL)
    cas.meta_path(digest).unlink()

    cas.put_bytes(SMALL)

    assert cas.problem(digest) is None


def test_batch_puts_then_one_barrier(cas: LocalCAS) -> None:
    digests = [cas.put_bytes(b"item %d" % n, durable=False) for n in range(50)]
    cas.sync()

    assert all(cas.get_bytes(d) == b"item %d" % n for n, d in enumerate(digests))


ROUNDS = 30


def _racer(root: str, mode: str, payload: bytes, gate, results) -> None:  # noqa: ANN001
    """Each round: all put at once, then each reads back, then one clears it."""
    store = LocalCAS(root, compression=mode)
    for round_no in range(ROUNDS):
        gate.wait()
        digest = store.put_stream(io.BytesIO(payload))
        gate.wait()
        results.put((digest, store.problem(digest)))
        gate.wait()
        if mode == "zstd" and round_no < ROUNDS - 1:
            store.remove(digest)


def test_two_processes_writing_one_object(cas: LocalCAS) -> None:
    """Concurrent writers (compressing or not) all succeed and leave one good copy."""
    context = multiprocessing.get_context("fork")
    modes = ("zstd", "none", "none", "none")
    gate = context.Barrier(len(modes))
    results = context.Queue()
    workers = [
        context.Process(target=_racer, args=(str(cas.root), mode, TEXT, gate, results))
        for mode in modes
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in range(len(modes) * ROUNDS)]
    for worker in workers:
        worker.join(60)

    assert [w.exitcode for w in workers] == [0] * len(modes)
    assert set(outcomes) == {(dg.of_bytes(TEXT), None)}
    assert cas.get_bytes(dg.of_bytes(TEXT)) == TEXT


def _populate(cas: LocalCAS) -> list[str]:
    return [cas.put_bytes(p) for p in (b"", SMALL, TEXT, NOISE)]


@pytest.mark.parametrize(
    "copy",
    [
        ["cp", "-a"],  # keeps modes and mtimes
        ["cp", "-r"],  # a plain recursive copy: fresh mtimes
    ],
    ids=["cp-a", "cp-r"],
)
def test_a_copied_tree_verifies_on_its_own(
    cas: LocalCAS, tmp_path: Path, copy: list[str]
) -> None:
    digests = _populate(cas)

    subprocess.run([*copy, str(cas.root), str(tmp_path / "copy")], check=True)
    copied = LocalCAS(tmp_path / "copy")

    assert sorted(copied.iter_digests()) == sorted(digests)
    assert all(copied.problem(d) is None for d in digests)


def test_a_copy_made_with_python_verifies(cas: LocalCAS, tmp_path: Path) -> None:
    digests = _populate(cas)

    shutil.copytree(cas.root, tmp_path / "copy", copy_function=shutil.copyfile)

    assert all(LocalCAS(tmp_path / "copy").problem(d) is None for d in digests)


def test_pins_are_files_with_reasons(cas: LocalCAS) -> None:
    digest = dg.of_bytes(SMALL)

    cas.pin(digest, "upload:tenant-a")
    cas.pin(digest, "upload:tenant-a")
    cas.pin(digest, "upload:tenant-b")
    reasons = sorted(p.reason for p in cas.iter_pins())
    removed_one = cas.unpin(digest, "upload:tenant-a")
    removed_rest = cas.unpin(digest)

    assert reasons == ["upload:tenant-a", "upload:tenant-b"]
    assert (removed_one, removed_rest) == (1, 1)
    assert list(cas.iter_pins()) == []
    with pytest.raises(InvalidDigest):
        cas.pin("xyz", "r")


def test_half_object_whose_raw_bytes_look_like_zstd(tmp_path: Path) -> None:
    """A sidecar rebuilt for a raw blob that merely starts with zstd's magic."""
    store = LocalCAS(tmp_path / "cas", compression="none")
    payload = b"\x28\xb5\x2f\xfd" + os.urandom(3 << 20)  # more than one chunk
    digest = store.put_bytes(payload)
    store.meta_path(digest).unlink()

    LocalCAS(tmp_path / "cas", compression="zstd").put_bytes(payload)

    assert store.meta(digest).encoding == "identity"
    assert store.get_bytes(digest) == payload
