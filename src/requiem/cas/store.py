"""The local CAS: one plain directory tree, restorable by a file copy.

Layout under the root::

    v2/objects/ab/cd/<digest>            the stored blob (raw or zstd frame)
    v2/objects/ab/cd/<digest>.meta.json  sidecar: encoding, sizes, stored-blob hash
    v2/tmp/                              temp files; renamed into place when complete

Nothing else is needed to verify the tree: each sidecar names the hash of the stored
bytes and the digest names the hash of the original bytes, so a copy made with
``cp -a``, ``rsync`` or ``aws s3 sync`` checks out on its own.

Writes are atomic: bytes go to a unique temp file that is fsynced and renamed into
place, then the directory is fsynced. The blob is renamed before its sidecar, and an
object counts as present only when both exist, so a crash between the two leaves an
object that a later put completes and ``verify`` reports, never a half object that is
served. Two writers of one object both succeed: each renames a complete copy of the
same bytes over the other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from requiem import digest as dg
from requiem.errors import IntegrityFailure, InvalidInput, NotFound

CHUNK = 1 << 20
SAMPLE = 1 << 20
MIN_COMPRESS = 512  # below this the zstd frame overhead is not worth it
GAIN_NEEDED = 0.9  # keep zstd only when it stores at most 90% of the original


class CasIntegrityFailed(IntegrityFailure):
    code = "cas_integrity_failed"


class CasObjectMissing(NotFound):
    code = "cas_object_not_found"


class InvalidDigest(InvalidInput):
    code = "invalid_digest"


@dataclass(frozen=True)
class ObjectMeta:
    digest: str
    encoding: str  # "identity" or "zstd"
    size: int
    stored_size: int
    stored_blake3: str
    created: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_digest(value: str) -> str:
    if not dg.is_digest(value):
        msg = f"not a digest (want 64 lowercase hex characters): {value[:80]!r}"
        raise InvalidDigest(msg)
    return value


class LocalCAS:
    """A CAS rooted at a plain directory."""

    def __init__(
        self, root: str | Path, *, compression: str = "auto", zstd_level: int = 3
    ) -> None:
        if compression not in ("auto", "zstd", "none"):
            msg = f"unknown compression mode {compression!r}"
            raise InvalidInput(msg)
        self.root = Path(root)
        self.objects = self.root / "v2" / "objects"
        self.tmp = self.root / "v2" / "tmp"
        self.compression = compression
        self.zstd_level = zstd_level

    @classmethod
    def from_settings(cls, settings) -> LocalCAS:  # noqa: ANN001 - avoids an import cycle
        return cls(
            settings.cas_dir,
            compression=str(settings.get("REQUIEM_CAS_COMPRESSION")),
            zstd_level=settings.int("REQUIEM_CAS_ZSTD_LEVEL"),
        )

    # -- paths ---------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:4] / digest

    def meta_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:4] / f"{digest}.meta.json"

    def ensure(self) -> None:
        """Create the directory tree (idempotent)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        _check_digest(digest)
        return self.meta_path(digest).is_file() and self.blob_path(digest).is_file()

    def put_bytes(self, data: bytes, *, durable: bool = True) -> str:
        """Store ``data``; returns its digest. Idempotent."""
        return self._put(iter((data,)) if data else iter(()), durable=durable)

    def put_stream(self, stream: BinaryIO, *, durable: bool = True) -> str:
        """Store the rest of ``stream`` in constant memory; returns its digest."""

        def chunks() -> Iterator[bytes]:
            while chunk := stream.read(CHUNK):
                yield chunk

        return self._put(chunks(), durable=durable)

    def put_file(self, path: str | Path, *, durable: bool = True) -> str:
        with open(path, "rb") as stream:
            return self.put_stream(stream, durable=durable)

    def _put(self, chunks: Iterator[bytes], *, durable: bool) -> str:
        self.ensure()
        first = b""
        for chunk in chunks:
            first += chunk
            if len(first) >= SAMPLE:
                break
        encoding = self._choose_encoding(first)

        content = dg.hasher()
        stored = dg.hasher()
        size = 0
        stored_size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="put-", suffix=".tmp")
        tmp_blob = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                compressor = (
                    zstandard.ZstdCompressor(level=self.zstd_level).compressobj()
                    if encoding == "zstd"
                    else None
                )

                def emit(raw: bytes) -> None:
                    nonlocal size, stored_size
                    content.update(raw)
                    size += len(raw)
                    piece = compressor.compress(raw) if compressor else raw
                    if piece:
                        stored.update(piece)
                        stored_size += len(piece)
                        out.write(piece)

                if first:
                    emit(first)
                for chunk in chunks:
                    emit(chunk)
                if compressor:
                    tail = compressor.flush()
                    stored.update(tail)
                    stored_size += len(tail)
                    out.write(tail)
                out.flush()
                if durable:
                    os.fsync(out.fileno())

            key = content.hexdigest()
            if self.exists(key):
                tmp_blob.unlink()
                return key
            meta = ObjectMeta(
                digest=key,
                encoding=encoding,
                size=size,
                stored_size=stored_size,
                stored_blake3=stored.hexdigest() if encoding == "zstd" else key,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            self._install(key, tmp_blob, meta, durable=durable)
            return key
        finally:
            if tmp_blob.exists():
                tmp_blob.unlink()

    def _choose_encoding(self, sample: bytes) -> str:
        """zstd when configured to, or when the first MiB shrinks enough to pay."""
        if self.compression == "none" or len(sample) < MIN_COMPRESS:
            return "identity"
        if self.compression == "zstd":
            return "zstd"
        trial = zstandard.ZstdCompressor(level=1).compress(sample)
        return "zstd" if len(trial) <= len(sample) * GAIN_NEEDED else "identity"

    def _install(
        self, key: str, tmp_blob: Path, meta: ObjectMeta, *, durable: bool
    ) -> None:
        folder = self.blob_path(key).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_meta_name = tempfile.mkstemp(
            dir=self.tmp, prefix="meta-", suffix=".tmp"
        )
        with os.fdopen(fd, "wb") as out:
            out.write(meta.to_json())
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp_blob, self.blob_path(key))
        os.replace(tmp_meta_name, self.meta_path(key))
        if durable:
            _fsync_dir(folder)

    def sync(self) -> None:
        """One durability barrier for puts made with ``durable=False``."""
        os.sync()

    # -- reading -------------------------------------------------------------------

    def meta(self, digest: str) -> ObjectMeta:
        _check_digest(digest)
        path = self.meta_path(digest)
        if not path.is_file() or not self.blob_path(digest).is_file():
            msg = f"no CAS object {digest}"
            raise CasObjectMissing(msg, digest=digest)
        try:
            fields = json.loads(path.read_bytes())
            meta = ObjectMeta(**fields)
        except (OSError, ValueError, TypeError) as exc:
            msg = f"CAS object {digest}: metadata unreadable"
            raise CasIntegrityFailed(
                msg, digest=digest, reason="metadata_unreadable"
            ) from exc
        if meta.digest != digest or meta.encoding not in ("identity", "zstd"):
            msg = f"CAS object {digest}: metadata does not describe this object"
            raise CasIntegrityFailed(msg, digest=digest, reason="metadata_unreadable")
        return meta

    def _raw_chunks(self, digest: str, meta: ObjectMeta) -> Iterator[bytes]:
        """Decoded chunks of the object, checking both hashes as the last chunk passes.

        The final ``CasIntegrityFailed`` is raised after the last chunk has been
        yielded, so callers that must never expose bad bytes write to a temp file or
        a buffer and publish only when the iterator finishes cleanly.
        """
        stored = dg.hasher()
        content = dg.hasher()
        stored_size = 0
        size = 0
        decompressor = (
            zstandard.ZstdDecompressor().decompressobj()
            if meta.encoding == "zstd"
            else None
        )
        try:
            with open(self.blob_path(digest), "rb") as blob:
                while piece := blob.read(CHUNK):
                    stored.update(piece)
                    stored_size += len(piece)
                    raw = decompressor.decompress(piece) if decompressor else piece
                    if raw:
                        content.update(raw)
                        size += len(raw)
                        yield raw
        except zstandard.ZstdError as exc:
            msg = f"CAS object {digest}: stored blob does not decompress"
            raise CasIntegrityFailed(
                msg, digest=digest, reason="stored_hash_mismatch"
            ) from exc
        except FileNotFoundError as exc:
            msg = f"no CAS object {digest}"
            raise CasObjectMissing(msg, digest=digest) from exc
        if stored_size != meta.stored_size or stored.hexdigest() != meta.stored_blake3:
            msg = f"CAS object {digest}: stored blob hash mismatch"
            raise CasIntegrityFailed(msg, digest=digest, reason="stored_hash_mismatch")
        if size != meta.size or content.hexdigest() != digest:
            msg = f"CAS object {digest}: content digest mismatch"
            raise CasIntegrityFailed(
                msg, digest=digest, reason="content_digest_mismatch"
            )

    def get_bytes(self, digest: str) -> bytes:
        """The object's bytes, verified in full before they are returned."""
        meta = self.meta(digest)
        return b"".join(self._raw_chunks(digest, meta))

    def get_to_file(self, digest: str, path: str | Path) -> ObjectMeta:
        """Write the object to ``path``, which appears only if every byte verified."""
        meta = self.meta(digest)
        target = Path(path)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent or ".", prefix=".requiem-get-"
        )
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self._raw_chunks(digest, meta):
                    out.write(chunk)
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return meta

    def get_to_stream(self, digest: str, out: BinaryIO) -> ObjectMeta:
        """Verify the object, then copy it to ``out``; a bad one writes nothing."""
        meta = self.meta(digest)
        for _ in self._raw_chunks(digest, meta):
            pass
        for chunk in self._raw_chunks(digest, meta):
            out.write(chunk)
        return meta

    def verify_object(self, digest: str) -> ObjectMeta:
        """Read the object through both hash checks; raises on any damage."""
        meta = self.meta(digest)
        for _ in self._raw_chunks(digest, meta):
            pass
        return meta

    # -- listing -------------------------------------------------------------------

    def iter_digests(self) -> Iterator[str]:
        """Digests of every blob or sidecar on disk, in directory order, streamed."""
        if not self.objects.is_dir():
            return
        for first in sorted(os.scandir(self.objects), key=lambda e: e.name):
            if not first.is_dir():
                continue
            for second in sorted(os.scandir(first.path), key=lambda e: e.name):
                if not second.is_dir():
                    continue
                names = set()
                for entry in os.scandir(second.path):
                    name = entry.name.removesuffix(".meta.json")
                    if dg.is_digest(name):
                        names.add(name)
                yield from sorted(names)

    def remove(self, digest: str) -> None:
        _check_digest(digest)
        for path in (self.meta_path(digest), self.blob_path(digest)):
            path.unlink(missing_ok=True)

    def disk_free(self) -> int:
        self.ensure()
        return shutil.disk_usage(self.root).free
