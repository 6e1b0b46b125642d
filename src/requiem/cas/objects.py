"""What a stored object is: its sidecar, its errors, and the checks every read makes.

The sidecar (``<digest>.meta.json``) records how the blob is encoded, the original
and stored sizes, and the BLAKE3 of the stored bytes. A read hashes the stored bytes
against ``stored_blake3`` and the decoded bytes against the digest; either mismatch
is a ``cas_integrity_failed`` with the reason that names it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass

from prometheus_client import Counter

from requiem import digest as dg
from requiem.errors import (
    IntegrityFailure,
    InvalidInput,
    NotFound,
    RequiemError,
    Unavailable,
)

ENCODINGS = ("identity", "zstd")
META_SUFFIX = ".meta.json"
MAX_SIDECAR = 64 << 10  # a real sidecar is ~300 bytes; more is not one of ours
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


INTEGRITY_FAILURES = Counter(
    "requiem_cas_integrity_failures",
    "CAS objects this process found corrupt (on a read or a verify); never served.",
)


class CasIntegrityFailed(IntegrityFailure):
    """A stored object failed its checks; each one found is counted for the P0 alert."""

    code = "cas_integrity_failed"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message, **details)
        INTEGRITY_FAILURES.inc()


class CasObjectMissing(NotFound):
    code = "cas_object_not_found"


class InvalidDigest(InvalidInput):
    code = "invalid_digest"


class CasStorageFull(Unavailable):
    code = "cas_storage_full"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def refused_write(exc: OSError, root: object) -> OSError | CasStorageFull:
    """The error to raise for a failed write: ``cas_storage_full`` when out of space."""
    if exc.errno in _FULL:
        msg = f"the CAS at {root} cannot take more data ({exc.strerror})"
        return CasStorageFull(msg, root=str(root))
    return exc


@dataclass(frozen=True)
class ObjectMeta:
    digest: str
    encoding: str  # "identity" or "zstd"
    size: int
    stored_size: int
    stored_blake3: str
    created: str

    def to_json(self) -> bytes:
        # NOTE: every field is hex, a number, a fixed word or an ISO timestamp, so
        # formatting by hand gives the same bytes as json.dumps(sort_keys=True) at a
        # fraction of its cost on the small-object hot path.
        return (
            f'{{"created": "{self.created}", "digest": "{self.digest}", '
            f'"encoding": "{self.encoding}", "size": {self.size}, '
            f'"stored_blake3": "{self.stored_blake3}", '
            f'"stored_size": {self.stored_size}}}'
        ).encode()


def check_digest(value: str) -> str:
    if not dg.is_digest(value):
        msg = f"not a digest (want 64 lowercase hex characters): {str(value)[:80]!r}"
        raise InvalidDigest(msg)
    return value


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_meta(digest: str, raw: bytes) -> ObjectMeta:
    """The sidecar's fields, type-checked; ValueError when it is not one of ours."""
    try:
        fields = json.loads(raw)
    except RecursionError as exc:
        msg = "sidecar nests too deeply"
        raise ValueError(msg) from exc
    if not isinstance(fields, dict) or set(fields) != set(
        ObjectMeta.__dataclass_fields__
    ):
        msg = "sidecar does not have the expected fields"
        raise ValueError(msg)
    meta = ObjectMeta(**fields)
    numbers_ok = all(type(v) is int and v >= 0 for v in (meta.size, meta.stored_size))
    if (
        meta.digest != digest
        or meta.encoding not in ENCODINGS
        or not numbers_ok
        or not dg.is_digest(meta.stored_blake3)
        or not isinstance(meta.created, str)
    ):
        msg = "sidecar does not describe this object"
        raise ValueError(msg)
    return meta


def open_regular(path: str) -> int:
    """A read descriptor for ``path`` if it is a regular file (no link, FIFO, device).

    A FIFO would block a read forever and a link to ``/dev/zero`` never end, so
    anything but a plain file is refused with an OSError before a byte is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def read_upto(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a small regular file, without a file object."""
    fd = open_regular(path)
    try:
        parts = []
        while limit > 0 and (part := os.read(fd, limit)):
            parts.append(part)
            limit -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def unreadable_blob(digest: str, exc: OSError) -> RequiemError:
    """The error a failed blob read means: missing, or present but unreadable."""
    if isinstance(exc, FileNotFoundError):
        return CasObjectMissing(f"no CAS object {digest}", digest=digest)
    msg = f"CAS object {digest}: stored blob unreadable ({exc.strerror})"
    return CasIntegrityFailed(msg, digest=digest, reason="stored_hash_mismatch")


def check_read(
    digest: str,
    meta: ObjectMeta,
    stored_size: int,
    stored_hash: str,
    size: int,
    content_hash: str,
) -> None:
    """Raise with the first reason the bytes read do not match the sidecar."""
    if stored_size != meta.stored_size or stored_hash != meta.stored_blake3:
        msg = f"CAS object {digest}: stored blob hash mismatch"
        raise CasIntegrityFailed(msg, digest=digest, reason="stored_hash_mismatch")
    if size != meta.size or content_hash != digest:
        msg = f"CAS object {digest}: content digest mismatch"
        raise CasIntegrityFailed(msg, digest=digest, reason="content_digest_mismatch")
