"""The action cache: request digest plus input digests → a stored result.

An entry is one small file ``<cas root>/v2/ac/<k[:2]>/<k>`` holding
``{"result_blob": "<digest>"}``, where ``k`` is ``of_record("cache", …)`` of the
request digest and the input map, and the blob is the result JSON
(``"kind": "requiem.result"``) in the CAS. ``cas gc`` walks these files to find the
results, and through them the streams and outputs, that are still in use.

Entries are written atomically (temp file, fsync, rename). A damaged entry, or one
whose result no longer verifies, is a miss, never an error: the run simply happens
again and rewrites it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from requiem import digest as dg
from requiem import log
from requiem.cas.files import fsync_dir
from requiem.cas.store import LocalCAS
from requiem.engine.models import ExecutionResult
from requiem.errors import RequiemError

_log = log.get("requiem.engine.cache")


def cache_key(request_digest: str, inputs: dict[str, str]) -> str:
    return dg.of_record("cache", {"request_digest": request_digest, "inputs": inputs})


def entry_path(cas: LocalCAS, key: str) -> Path:
    return cas.root / "v2" / "ac" / key[:2] / key


def lookup(cas: LocalCAS, key: str, request_digest: str) -> ExecutionResult | None:
    """The cached result for ``key`` with ``cache_hit`` set, or None.

    The entry must name a result of ``request_digest`` whose streams and outputs
    are all present; anything else is a miss (a damaged or foreign entry).
    """
    path = entry_path(cas, key)
    try:
        entry = dg.parse_json(path.read_bytes())
        blob = entry["result_blob"]
        stored = dg.parse_json(cas.get_bytes(blob))
        if not isinstance(stored, dict) or stored.pop("kind", None) != (
            "requiem.result"
        ):
            return None
        result = ExecutionResult.model_validate(stored)
        if result.request_digest != request_digest:
            _log.warning("engine.cache_entry_foreign", key=key)
            return None
        named = [result.stdout_digest, result.stderr_digest]
        if not all(cas.exists(d) for d in [*named, *result.output_digests.values()]):
            return None
    except FileNotFoundError:
        return None
    except (OSError, KeyError, TypeError, ValueError, RequiemError) as exc:
        _log.warning("engine.cache_entry_unusable", key=key, reason=str(exc)[:200])
        return None
    return result.model_copy(update={"cache_hit": True, "result_blob": blob})


def store(cas: LocalCAS, key: str, result_blob: str) -> None:
    """Point ``key`` at ``result_blob``, atomically."""
    path = entry_path(cas, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    cas.ensure()
    fd, tmp_name = tempfile.mkstemp(dir=cas.tmp, prefix="ac-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps({"result_blob": result_blob}).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    fsync_dir(path.parent)
