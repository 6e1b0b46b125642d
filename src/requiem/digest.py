"""BLAKE3 digests and RFC 8785 canonical JSON.

Two kinds of digest exist and must never be confused:

* a *content* digest is the plain BLAKE3 of bytes, so ``b3sum`` and any BLAKE3 tool
  agree with every CAS key Requiem prints;
* a *record* digest is the BLAKE3 of ``"<domain>:" + canonical_json(record)``. The
  domain (``req``, ``res``, ``trace``, ``evt`` …) makes a request, a result and a trace
  hash differently even if their JSON were byte-identical.

Strict parsing lives here too: the standard ``json`` module silently keeps the last of
duplicate keys and accepts ``NaN``; a digest over such input would be ambiguous, so both
are refused with their own error codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import blake3 as _blake3
import rfc8785

from requiem.errors import JsonDuplicateKey, JsonParseError

DIGEST_HEX_LEN = 64
CHUNK = 1 << 20
DOMAINS = frozenset(
    {"req", "res", "trace", "evt", "audit", "ckpt", "cache", "policy", "out"}
)
_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_digest(text: object) -> bool:
    """True if ``text`` is 64 lowercase hex characters."""
    return isinstance(text, str) and _HEX.fullmatch(text) is not None


def hasher() -> Any:
    """A fresh incremental BLAKE3 hasher (``update`` then ``hexdigest``)."""
    return _blake3.blake3(max_threads=1)


def of_bytes(data: bytes | bytearray | memoryview) -> str:
    """Plain BLAKE3 hex of ``data``."""
    return _blake3.blake3(data).hexdigest()


def of_chunks(chunks: Iterable[bytes]) -> str:
    h = hasher()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def of_stream(stream: BinaryIO) -> str:
    """Plain BLAKE3 hex of everything left in ``stream``, read in 1 MiB chunks."""
    h = hasher()
    while chunk := stream.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def of_file(path: str | Path) -> str:
    with open(path, "rb") as stream:
        return of_stream(stream)


def canonical_json(value: Any) -> bytes:
    """RFC 8785 bytes of ``value``; NaN, Infinity and non-JSON types are refused."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        msg = f"value cannot be canonicalised as JSON: {exc}"
        raise JsonParseError(msg) from exc


def of_record(domain: str, record: Any) -> str:
    """BLAKE3 hex of ``domain:`` followed by the canonical JSON of ``record``."""
    if domain not in DOMAINS:
        msg = f"unknown digest domain {domain!r}"
        raise ValueError(msg)
    h = hasher()
    h.update(domain.encode("ascii") + b":")
    h.update(canonical_json(record))
    return h.hexdigest()


def _refuse_constant(name: str) -> Any:
    msg = f"{name} is not valid JSON"
    raise JsonParseError(msg)


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            msg = f"duplicate key {key!r} in JSON object"
            raise JsonDuplicateKey(msg, key=key)
        result[key] = value
    return result


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_lone_surrogates(value: Any) -> None:
    """JsonParseError if any string holds half a surrogate pair (not valid Unicode)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                msg = "JSON string holds a lone surrogate escape (not valid Unicode)"
                raise JsonParseError(msg) from exc


def parse_json(text: str | bytes) -> Any:
    """Parse JSON strictly: no duplicate keys, no NaN/Infinity, valid Unicode only."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            msg = f"JSON is not valid UTF-8 at byte {exc.start}"
            raise JsonParseError(msg) from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as exc:
        msg = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise JsonParseError(msg) from exc
    except RecursionError as exc:
        msg = "JSON nests too deeply"
        raise JsonParseError(msg) from exc
    except ValueError as exc:  # e.g. an integer longer than int() accepts
        msg = f"invalid JSON: {str(exc).split(';')[0]}"
        raise JsonParseError(msg) from exc
    if _SURROGATE_ESCAPE.search(text):  # only then can a string be broken
        _refuse_lone_surrogates(value)
    return value
