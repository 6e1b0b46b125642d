"""The local CAS: one plain directory tree, restorable by a file copy.

Layout under the root::

    v2/objects/ab/cd/<digest>            the stored blob (raw or one zstd frame)
    v2/objects/ab/cd/<digest>.meta.json  sidecar: encoding, sizes, stored-blob hash
    v2/pins/ab/<digest>.<reason key>     explicit GC roots (see :meth:`LocalCAS.pin`)
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

Batches (``durable=False``) skip the per-object fsyncs; :meth:`LocalCAS.sync` is their
one durability barrier, and nothing put in a batch is acknowledged before it returns.
A crash before that barrier can leave a torn blob behind a complete sidecar: reads
refuse it (``cas_integrity_failed``) and the next put of the same bytes rewrites it,
because a put trusts an existing object only when its blob has the size its sidecar
records.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import zstandard

from requiem import digest as dg
from requiem.cas import pins
from requiem.cas.files import fsync_dir, fsync_file, move_no_replace, sync_filesystem
from requiem.cas.objects import (
    MAX_SIDECAR,
    META_SUFFIX,
    ZSTD_MAGIC,
    CasIntegrityFailed,
    CasObjectMissing,
    InvalidDigest,
    ObjectMeta,
    check_digest,
    check_read,
    now,
    open_regular,
    parse_meta,
    read_upto,
    refused_write,
    unreadable_blob,
)
from requiem.cas.pins import Pin
from requiem.errors import InvalidInput

__all__ = [
    "CasIntegrityFailed",
    "CasObjectMissing",
    "InvalidDigest",
    "LocalCAS",
    "ObjectMeta",
    "Pin",
]

CHUNK = 1 << 20
SAMPLE = 1 << 20  # objects up to this size are handled whole, in memory
TRIAL = 128 << 10  # auto mode decides on a trial compression of this much
MIN_COMPRESS = 512  # below this the zstd frame overhead is not worth it
GAIN_NEEDED = 0.9  # keep zstd only when it stores at most 90% of the original
PARALLEL_HASH_FROM = 4 << 20  # blobs this large are hashed on every core
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_serial = itertools.count()


class LocalCAS:
    """A CAS rooted at a plain directory. Safe to share between threads."""

    def __init__(
        self, root: str | Path, *, compression: str = "auto", zstd_level: int = 3
    ) -> None:
        if compression not in ("auto", "zstd", "none"):
            msg = f"unknown compression mode {compression!r}"
            raise InvalidInput(msg)
        self.root = Path(root)
        self.objects = self.root / "v2" / "objects"
        self.tmp = self.root / "v2" / "tmp"
        self.pins = self.root / "v2" / "pins"
        self.action_cache = self.root / "v2" / "ac"
        self.compression = compression
        self.zstd_level = zstd_level
        self._ready = False
        self._objects = str(self.objects)
        self._local = threading.local()  # zstd contexts are not thread-safe

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
        return self.objects / digest[:2] / digest[2:4] / f"{digest}{META_SUFFIX}"

    def _folder(self, digest: str) -> str:
        return f"{self._objects}/{digest[:2]}/{digest[2:4]}"

    def _blob_name(self, digest: str) -> str:
        """``blob_path`` as a plain string: the hot paths skip pathlib's cost."""
        return f"{self._objects}/{digest[:2]}/{digest[2:4]}/{digest}"

    def ensure(self) -> None:
        """Create the directory tree (idempotent)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._ready = True

    def _temp_name(self, kind: str) -> str:
        return f"{self.tmp}/{kind}-{os.getpid()}-{next(_serial)}.tmp"

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        return cctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    # -- writing -------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        check_digest(digest)
        try:
            os.stat(self.meta_path(digest))
            os.stat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return True

    def _already_stored(self, digest: str, *, durable: bool) -> bool:
        """True when a whole copy is on disk; marks it recently used for GC.

        A durable put that finds the object also makes the copy durable: it may
        come from a batch whose barrier has not run yet.
        """
        blob_path = self._blob_name(digest)
        meta_path = blob_path + META_SUFFIX
        try:
            meta = parse_meta(digest, read_upto(meta_path, MAX_SIDECAR))
            intact = os.stat(blob_path).st_size == meta.stored_size
            if intact and durable:
                fsync_file(blob_path)
                fsync_file(meta_path)
        except (OSError, ValueError, TypeError):
            return False
        if intact:
            os.utime(meta_path)
        return intact

    def put_bytes(self, data: bytes, *, durable: bool = True) -> str:
        """Store ``data``; returns its digest. Idempotent."""
        key = dg.of_bytes(data)
        if self._already_stored(key, durable=durable):
            return key
        encoding, stored = self._encode_whole(data)
        stored_hash = key if encoding == "identity" else dg.of_bytes(stored)
        meta = ObjectMeta(key, encoding, len(data), len(stored), stored_hash, now())
        tmp_blob = self._write_temp("put", (stored,), durable=durable)
        self._install(key, tmp_blob, meta, durable=durable)
        return key

    def put_stream(self, stream: BinaryIO, *, durable: bool = True) -> str:
        """Store the rest of ``stream`` in constant memory; returns its digest."""
        first = bytearray()
        while len(first) < SAMPLE:
            chunk = stream.read(SAMPLE - len(first))
            if not chunk:
                return self.put_bytes(bytes(first), durable=durable)
            first += chunk
        return self._put_large(bytes(first), stream, durable=durable)

    def put_file(self, path: str | Path, *, durable: bool = True) -> str:
        with open(path, "rb") as stream:
            return self.put_stream(stream, durable=durable)

    def _encode_whole(self, data: bytes) -> tuple[str, bytes]:
        """The encoding and stored bytes for an object held in memory."""
        if self.compression == "none" or len(data) < MIN_COMPRESS:
            return "identity", data
        if len(data) > TRIAL and self._stream_encoding(data) == "identity":
            return "identity", data
        packed = self._compressor().compress(data)
        if self.compression == "zstd" or len(packed) <= len(data) * GAIN_NEEDED:
            return "zstd", packed
        return "identity", data

    def _stream_encoding(self, start: bytes) -> str:
        """zstd when configured to, or when a trial on the start shrinks enough."""
        if self.compression != "auto":
            return "zstd" if self.compression == "zstd" else "identity"
        sample = start[:TRIAL]
        trial = zstandard.ZstdCompressor(level=1).compress(sample)
        return "zstd" if len(trial) <= len(sample) * GAIN_NEEDED else "identity"

    def _put_large(self, first: bytes, stream: BinaryIO, *, durable: bool) -> str:
        encoding = self._stream_encoding(first)
        content = dg.hasher()
        stored = content if encoding == "identity" else dg.hasher()
        # NOTE: one thread on purpose: zstd's worker threads buy little on two
        # cores and hold several MiB of job buffers each, against a 64 MiB bound.
        packer = self._compressor().compressobj(size=-1) if encoding == "zstd" else None
        sizes = [0, 0]

        def pieces() -> Iterator[bytes]:
            chunk = first
            while chunk:
                content.update(chunk)
                sizes[0] += len(chunk)
                piece = packer.compress(chunk) if packer else chunk
                if packer:
                    stored.update(piece)
                sizes[1] += len(piece)
                yield piece
                chunk = stream.read(CHUNK)
            if packer:
                tail = packer.flush()
                stored.update(tail)
                sizes[1] += len(tail)
                yield tail

        tmp_blob = self._write_temp("put", pieces(), durable=durable)
        key = content.hexdigest()
        if self._already_stored(key, durable=durable):
            os.unlink(tmp_blob)
            return key
        meta = ObjectMeta(key, encoding, sizes[0], sizes[1], stored.hexdigest(), now())
        self._install(key, tmp_blob, meta, durable=durable)
        return key

    def _write_temp(self, kind: str, pieces: Any, *, durable: bool) -> str:
        """A new temp file holding ``pieces``; removed again if writing fails."""
        if not self._ready:
            self.ensure()
        name = self._temp_name(kind)
        try:
            fd = os.open(name, _FILE_FLAGS, 0o644)
        except FileNotFoundError:
            self.ensure()
            fd = os.open(name, _FILE_FLAGS, 0o644)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(name)
            raise refused_write(exc, self.root) from exc
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        return name

    def _install(
        self, key: str, tmp_blob: str, meta: ObjectMeta, *, durable: bool
    ) -> None:
        """Put blob then sidecar in place; fsync the folder when durable.

        The blob is moved in without replacing an existing file: when another
        writer got there first, its blob stays and the sidecar written is the one
        that describes it, so two writers with different encodings (or zstd
        settings) can never leave a sidecar that belongs to the other's blob.
        """
        final_blob = self._blob_name(key)
        try:
            try:
                move_no_replace(tmp_blob, final_blob)
            except FileNotFoundError:  # first object of its ab/cd/ folder
                self._make_folder(key, durable=durable)
                move_no_replace(tmp_blob, final_blob)
        except FileExistsError:
            existing = self._describe_blob(key)
            if existing is None:
                os.replace(tmp_blob, final_blob)  # a torn copy left by a crash
            else:
                os.unlink(tmp_blob)
                if durable:
                    fsync_file(final_blob)  # another writer's, maybe not yet synced
                meta = existing
        except BaseException:
            os.unlink(tmp_blob)
            raise
        tmp_meta = self._write_temp("meta", (meta.to_json(),), durable=durable)
        os.rename(tmp_meta, final_blob + META_SUFFIX)
        if durable:
            fsync_dir(self._folder(key))

    def _describe_blob(self, digest: str) -> ObjectMeta | None:
        """The sidecar for the blob on disk, or None when it is not this object."""
        stored = dg.hasher()
        content = dg.hasher()
        stored_size = size = 0
        try:
            with os.fdopen(open_regular(self._blob_name(digest)), "rb") as blob:
                unpacker = (
                    self._decompressor().decompressobj()
                    if blob.read(4) == ZSTD_MAGIC
                    else None
                )
                blob.seek(0)
                while piece := blob.read(CHUNK):
                    stored.update(piece)
                    stored_size += len(piece)
                    if unpacker is None:
                        continue
                    try:
                        raw = unpacker.decompress(piece)
                    except zstandard.ZstdError:
                        unpacker = None  # raw bytes that start like a zstd frame
                        continue
                    content.update(raw)
                    size += len(raw)
        except OSError:  # gone, or not a regular file: not a good copy
            return None
        if unpacker is not None and content.hexdigest() == digest:
            encoding, size_out = "zstd", size
        elif stored.hexdigest() == digest:
            encoding, size_out = "identity", stored_size
        else:
            return None
        return ObjectMeta(
            digest, encoding, size_out, stored_size, stored.hexdigest(), now()
        )

    def _make_folder(self, key: str, *, durable: bool) -> None:
        """Create ``ab/cd/`` for ``key``; new directory entries are made durable."""
        outer = self.objects / key[:2]
        inner = outer / key[2:4]
        for parent, child in ((self.objects, outer), (outer, inner)):
            try:
                child.mkdir()
            except FileExistsError:
                continue
            if durable:
                fsync_dir(parent)

    def put_batch(self, blobs: Iterable[bytes], *, workers: int = 4) -> list[str]:
        """Store many objects behind one durability barrier; their digests, in order.

        Writes overlap on a few threads (the work is mostly system calls, which
        release the GIL); nothing is acknowledged before the final :meth:`sync`.
        """
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(partial(self.put_bytes, durable=False), blobs))
        self.sync()
        return digests

    def sync(self) -> None:
        """One durability barrier for puts made with ``durable=False``."""
        sync_filesystem(self.root if self.root.is_dir() else Path("."))

    # -- reading -------------------------------------------------------------------

    def meta(self, digest: str) -> ObjectMeta:
        """The sidecar of a present object; missing or unreadable ones raise."""
        check_digest(digest)
        meta = self._read_meta(digest)
        if not self.blob_path(digest).is_file():
            msg = f"no CAS object {digest}"
            raise CasObjectMissing(msg, digest=digest)
        return meta

    def _read_meta(self, digest: str) -> ObjectMeta:
        try:
            raw = read_upto(self._blob_name(digest) + META_SUFFIX, MAX_SIDECAR)
        except (FileNotFoundError, NotADirectoryError) as exc:
            msg = f"no CAS object {digest}"
            raise CasObjectMissing(msg, digest=digest) from exc
        except OSError as exc:
            msg = f"CAS object {digest}: metadata unreadable"
            raise CasIntegrityFailed(
                msg, digest=digest, reason="metadata_unreadable"
            ) from exc
        try:
            return parse_meta(digest, raw)
        except (ValueError, TypeError) as exc:
            msg = f"CAS object {digest}: metadata unreadable"
            raise CasIntegrityFailed(
                msg, digest=digest, reason="metadata_unreadable"
            ) from exc

    def _open_blob(self, digest: str) -> BinaryIO:
        try:
            return os.fdopen(open_regular(self._blob_name(digest)), "rb")
        except OSError as exc:
            raise unreadable_blob(digest, exc) from exc

    def _decoded_chunks(self, digest: str, meta: ObjectMeta) -> Iterator[bytes]:
        """Decoded chunks of the object, checking both hashes as the last chunk passes.

        The final ``CasIntegrityFailed`` is raised after the last chunk has been
        yielded, so a caller that must never expose bad bytes writes to a private
        temp file or a buffer and publishes only when the iterator ends cleanly.
        """
        threads = blake3.blake3.AUTO if meta.stored_size >= PARALLEL_HASH_FROM else 1
        stored = blake3.blake3(max_threads=threads)
        identity = meta.encoding == "identity"
        content = stored if identity else dg.hasher()
        unpacker = None if identity else self._decompressor().decompressobj()
        stored_size = size = 0
        broken = False
        with self._open_blob(digest) as blob:
            while piece := blob.read(CHUNK):
                stored.update(piece)
                stored_size += len(piece)
                if stored_size > meta.stored_size:
                    break  # longer than recorded: reported below, not read to its end
                if identity:
                    raw = piece
                elif broken:
                    continue  # hash the rest to name the right reason
                else:
                    try:
                        raw = unpacker.decompress(piece)
                    except zstandard.ZstdError:
                        broken = True
                        continue
                    content.update(raw)
                size += len(raw)
                if raw and size <= meta.size:
                    yield raw
        check_read(
            digest,
            meta,
            stored_size,
            stored.hexdigest(),
            -1 if broken else size,
            content.hexdigest(),
        )

    def _small_get(self, digest: str, meta: ObjectMeta) -> bytes:
        """A small object read whole, both hashes checked; no bad byte escapes."""
        try:
            stored_bytes = read_upto(self._blob_name(digest), meta.stored_size + 1)
        except OSError as exc:
            raise unreadable_blob(digest, exc) from exc
        stored_hash = dg.of_bytes(stored_bytes)
        data, content_hash = b"", ""
        if meta.encoding == "identity":
            data, content_hash = stored_bytes, stored_hash
        elif stored_hash == meta.stored_blake3:
            try:
                data = self._decompressor().decompress(stored_bytes)
                content_hash = dg.of_bytes(data)
            except zstandard.ZstdError:
                pass  # reported below as a content mismatch
        check_read(
            digest, meta, len(stored_bytes), stored_hash, len(data), content_hash
        )
        return data

    def get_bytes(self, digest: str) -> bytes:
        """The object's bytes, verified in full before they are returned."""
        check_digest(digest)
        meta = self._read_meta(digest)
        if meta.stored_size <= SAMPLE and meta.size <= SAMPLE:
            return self._small_get(digest, meta)
        return b"".join(self._decoded_chunks(digest, meta))

    def get_to_file(self, digest: str, path: str | Path) -> ObjectMeta:
        """Write the object to ``path``, which appears only if every byte verified."""
        check_digest(digest)
        meta = self._read_meta(digest)
        target = Path(path)
        tmp_name = f"{target.parent}/.requiem-get-{os.getpid()}-{next(_serial)}"
        try:
            with open(tmp_name, "xb") as out:
                for chunk in self._decoded_chunks(digest, meta):
                    out.write(chunk)
        except BaseException:
            os.unlink(tmp_name)
            raise
        os.replace(tmp_name, target)
        return meta

    def get_to_stream(self, digest: str, out: BinaryIO) -> ObjectMeta:
        """Copy the object to ``out`` after it verified; a bad one writes nothing.

        Small objects are checked in memory; larger ones are decoded into a private
        temp file first, so the bytes written are exactly the bytes that verified
        even if the blob changes on disk meanwhile.
        """
        check_digest(digest)
        meta = self._read_meta(digest)
        if meta.stored_size <= SAMPLE and meta.size <= SAMPLE:
            out.write(self._small_get(digest, meta))
            return meta
        if not self._ready:
            self.ensure()
        spool = self._temp_name("get")
        try:
            with open(spool, "xb+") as buffer:
                for chunk in self._decoded_chunks(digest, meta):
                    buffer.write(chunk)
                buffer.seek(0)
                shutil.copyfileobj(buffer, out, CHUNK)
        finally:
            os.unlink(spool)
        return meta

    def verify_object(self, digest: str) -> ObjectMeta:
        """Read the object through both hash checks; raises on any damage."""
        check_digest(digest)
        meta = self._read_meta(digest)
        if meta.stored_size <= SAMPLE and meta.size <= SAMPLE:
            self._small_get(digest, meta)
        else:
            for _ in self._decoded_chunks(digest, meta):
                pass
        return meta

    def problem(self, digest: str) -> str | None:
        """Why the object fails verification, as a reason string; None when good.

        Reasons: ``missing_blob``, ``missing_metadata``, ``metadata_unreadable``,
        ``stored_hash_mismatch``, ``content_digest_mismatch``; ``gone`` when neither
        file exists any more (removed while a listing was being walked).
        """
        try:
            self.verify_object(digest)
            return None
        except CasIntegrityFailed as exc:
            return str(exc.details["reason"])
        except CasObjectMissing:
            pass
        has_meta = os.path.exists(self.meta_path(digest))
        has_blob = os.path.exists(self.blob_path(digest))
        if has_meta and has_blob:  # completed by a writer meanwhile
            return self.problem(digest)
        if has_meta:
            return "missing_blob"
        return "missing_metadata" if has_blob else "gone"

    # -- listing -------------------------------------------------------------------

    def iter_digests(self) -> Iterator[str]:
        """Digests of every blob or sidecar on disk, in sorted order, streamed."""
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
                    name = entry.name.removesuffix(META_SUFFIX)
                    if dg.is_digest(name):
                        names.add(name)
                yield from sorted(names)

    def iter_temp_files(self) -> Iterator[tuple[Path, float]]:
        """Each file in the temp directory with its last modification time."""
        if not self.tmp.is_dir():
            return
        for entry in os.scandir(self.tmp):
            try:
                yield Path(entry.path), entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # renamed into place while we looked

    def last_used(self, digest: str) -> float | None:
        """Newest mtime of the blob and sidecar (a put of a stored object renews it)."""
        times = []
        for path in (self.meta_path(digest), self.blob_path(digest)):
            try:
                times.append(os.stat(path).st_mtime)
            except FileNotFoundError:
                continue
        return max(times) if times else None

    def remove(self, digest: str) -> None:
        """Delete the object: sidecar first, so it stops counting as present."""
        check_digest(digest)
        for path in (self.meta_path(digest), self.blob_path(digest)):
            path.unlink(missing_ok=True)

    def disk_free(self) -> int:
        self.ensure()
        return shutil.disk_usage(self.root).free

    # -- pins ----------------------------------------------------------------------

    def pin(self, digest: str, reason: str) -> None:
        """Keep ``digest`` through GC for ``reason`` until unpinned. Idempotent.

        The object need not exist yet: pinning before uploading closes the window
        in which a collection could remove a freshly deduplicated object.
        """
        check_digest(digest)
        if not reason:
            msg = "a pin needs a reason"
            raise InvalidInput(msg)
        pins.add(self.pins, digest, reason)

    def unpin(self, digest: str, reason: str | None = None) -> int:
        """Drop the pin for ``reason`` (every pin of ``digest`` when None); count."""
        check_digest(digest)
        return pins.remove(self.pins, digest, reason)

    def iter_pins(self) -> Iterator[Pin]:
        """Every pin, in digest order."""
        return pins.iter_all(self.pins)
