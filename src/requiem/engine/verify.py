"""``requiem digest verify --result R``: recompute every digest a result file names.

A result file stands on its own: it carries its normalised request, its trace and
its digests. Verifying it recomputes the request, trace and result digests from
what the file says, and reads each stream and output object from the local CAS
through its hash checks. Nothing is run. The report is printed here as plain text
or JSON (the engine sits below the CLI layer and does not borrow its helpers).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from requiem import digest as dg
from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine.errors import InvalidRequest, ResultVerifyFailed
from requiem.engine.models import MAX_REQUEST_BYTES, ExecutionResult
from requiem.errors import FileMissing, RequiemError

MAX_RESULT_BYTES = 64 * MAX_REQUEST_BYTES


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def load_result(path: Path) -> ExecutionResult:
    """A result file, parsed strictly; InvalidRequest when it is not one."""
    if not path.is_file():
        msg = f"no such result file: {path}"
        raise FileMissing(msg, path=str(path))
    if path.stat().st_size > MAX_RESULT_BYTES:
        msg = f"{path} is larger than {MAX_RESULT_BYTES} bytes; not a result file"
        raise InvalidRequest(msg, path=str(path))
    raw = dg.parse_json(path.read_bytes())
    if isinstance(raw, dict):
        raw.pop("kind", None)
    try:
        return ExecutionResult.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "result"
        msg = f"{path} is not a result: {where}: {first['msg']}"
        raise InvalidRequest(msg, path=str(path)) from None


def _digest_check(name: str, recorded: str, recomputed: str) -> Check:
    if recorded == recomputed:
        return Check(name, True, recorded)
    return Check(name, False, f"recorded {recorded}, recomputed {recomputed}")


def _object_check(cas: LocalCAS, name: str, digest: str) -> Check:
    try:
        meta = cas.verify_object(digest)
    except RequiemError as exc:
        return Check(name, False, f"{exc.code}: {exc.message}")
    return Check(name, True, f"{digest} ({meta.size} bytes)")


def checks_for(result: ExecutionResult, cas: LocalCAS) -> list[Check]:
    """Every check of ``result``, in a fixed order."""
    checks = [
        _digest_check(
            "request_digest", result.request_digest, dg.of_record("req", result.request)
        ),
        _digest_check(
            "trace_digest",
            result.trace_digest,
            dg.of_record("trace", result.trace_events),
        ),
        _digest_check(
            "result_digest",
            result.result_digest,
            dg.of_record("res", result.reproducible()),
        ),
        _object_check(cas, "stdout", result.stdout_digest),
        _object_check(cas, "stderr", result.stderr_digest),
    ]
    for path, digest in sorted(result.output_digests.items()):
        checks.append(_object_check(cas, f"output:{path}", digest))
    if result.request_blob is not None:
        blob = _object_check(cas, "request_blob", result.request_blob)
        if blob.ok:
            stored = dg.parse_json(cas.get_bytes(result.request_blob))
            if stored != {"kind": "requiem.request", "request": result.request}:
                blob = Check("request_blob", False, "stored request differs from file")
        checks.append(blob)
    if result.result_blob is not None:
        blob = _object_check(cas, "result_blob", result.result_blob)
        if blob.ok:
            stored = dg.parse_json(cas.get_bytes(result.result_blob))
            if stored != result.stored():
                blob = Check("result_blob", False, "stored result differs from file")
        checks.append(blob)
    return checks


def verify_result_file(path: Path, as_json: bool) -> int:
    """Print every check of the result at ``path``; 0 when all hold, else 4."""
    result = load_result(Path(path))
    config = settings.load()
    checks = checks_for(result, LocalCAS.from_settings(config))
    failed = [c for c in checks if not c.ok]

    if as_json:
        body: dict[str, Any] = {
            "ok": not failed,
            "result_digest": result.result_digest,
            "checks": [c.__dict__ for c in checks],
        }
        sys.stdout.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            status = "ok" if c.ok else "FAILED"
            sys.stdout.write(f"{c.name:<{width}}  {status:<6}  {c.detail}\n")
    sys.stdout.flush()
    if not failed:
        return 0
    error = ResultVerifyFailed(
        f"{len(failed)} check(s) failed; first: {failed[0].name}: {failed[0].detail}"
    )
    sys.stderr.write(f"requiem: error[{error.code}]: {error.message}\n")
    return error.exit_code
