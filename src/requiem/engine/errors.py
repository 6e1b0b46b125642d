"""Errors of the execution engine.

Raised before anything is spawned (bad request, missing input, no sandbox in strict
mode), or named by ``error_code`` in a result when the process ran but the outcome
does not hold (``timeout``, ``missing_output``, ``spawn_failed``)::

    InvalidInput (400, exit 2)
    ├── InvalidRequest          invalid_request
    ├── InvalidRequestId        invalid_request_id
    ├── InvalidPolicy           invalid_policy
    ├── TooManyOutputs          too_many_outputs
    ├── PathEscape              path_escape
    └── EnvRequiredMissing      env_required_missing
    TooLarge (413, exit 2)
    └── RequestTooLarge         request_too_large
    NotFound (404, exit 3)
    └── MissingInput            missing_input
    Conflict (409, exit 8)
    └── OutputNotWritable       output_not_writable   copying outputs back
    Unprocessable (422, exit 5)
    ├── SpawnFailed             spawn_failed          exit 127
    ├── ExecutionTimeout        timeout               504, exit 124
    ├── MissingOutput           missing_output
    ├── OutputTooLarge          output_too_large      outputs past 4 GiB in all
    ├── DriftDetected           drift_detected
    └── ReplayFailed            replay_failed
    IntegrityFailure (500, exit 4)
    └── ResultVerifyFailed      result_verify_failed
    Unavailable (503, exit 6)
    ├── SandboxUnavailable      sandbox_unavailable
    └── StorageFailed           storage_failed        the CAS refused a write
"""

from __future__ import annotations

from requiem.errors import (
    Conflict,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    RequiemError,
    TooLarge,
    Unavailable,
    Unprocessable,
)


class RequestTooLarge(TooLarge):
    code = "request_too_large"


class InvalidRequest(InvalidInput):
    code = "invalid_request"


class InvalidRequestId(InvalidInput):
    code = "invalid_request_id"


class InvalidPolicy(InvalidInput):
    code = "invalid_policy"


class TooManyOutputs(InvalidInput):
    code = "too_many_outputs"


class PathEscape(InvalidInput):
    code = "path_escape"


class EnvRequiredMissing(InvalidInput):
    code = "env_required_missing"


class MissingInput(NotFound):
    code = "missing_input"


class SpawnFailed(Unprocessable):
    code = "spawn_failed"
    exit_code = 127


class ExecutionTimeout(Unprocessable):
    code = "timeout"
    http_status = 504
    exit_code = 124


class MissingOutput(Unprocessable):
    code = "missing_output"


class OutputTooLarge(Unprocessable):
    code = "output_too_large"


class OutputNotWritable(Conflict):
    code = "output_not_writable"


class DriftDetected(Unprocessable):
    code = "drift_detected"


class ReplayFailed(Unprocessable):
    code = "replay_failed"


class ResultVerifyFailed(IntegrityFailure):
    code = "result_verify_failed"


class SandboxUnavailable(Unavailable):
    code = "sandbox_unavailable"


class StorageFailed(Unavailable):
    code = "storage_failed"


# The codes a result's ``error_code`` can carry, with the class that describes each.
RESULT_ERRORS: dict[str, type[RequiemError]] = {
    cls.code: cls
    for cls in (
        SpawnFailed,
        ExecutionTimeout,
        MissingOutput,
        OutputTooLarge,
        PathEscape,
    )
}
