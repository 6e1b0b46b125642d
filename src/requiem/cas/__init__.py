"""Content-addressed store: blobs keyed by the plain BLAKE3 of their bytes."""

from requiem.cas.pins import Pin
from requiem.cas.store import (
    CasIntegrityFailed,
    CasObjectMissing,
    InvalidDigest,
    LocalCAS,
    ObjectMeta,
)

__all__ = [
    "CasIntegrityFailed",
    "CasObjectMissing",
    "InvalidDigest",
    "LocalCAS",
    "ObjectMeta",
    "Pin",
]
