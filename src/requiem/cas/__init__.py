"""Content-addressed store: blobs keyed by the plain BLAKE3 of their bytes."""

from requiem.cas.store import CasIntegrityFailed, CasObjectMissing, LocalCAS, ObjectMeta

__all__ = ["CasIntegrityFailed", "CasObjectMissing", "LocalCAS", "ObjectMeta"]
