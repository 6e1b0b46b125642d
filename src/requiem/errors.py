"""The one exception tree of Requiem.

Every error a user can meet is a subclass of :class:`RequiemError` carrying a stable
``code`` (a snake_case string documented in the README), the HTTP status the API answers
with, and the exit code the CLI ends with. Codes are unique across the whole tree
(a test walks it). Library errors are mapped to the most specific class at the boundary
with ``raise … from exc``.

    RequiemError                      500 / 1
    ├── InvalidInput                  400 / 2   bad request, bad argument, bad file
    ├── Unauthenticated               401 / 7
    ├── Forbidden                     403 / 7
    ├── NotFound                      404 / 3
    ├── Conflict                      409 / 8
    ├── TooLarge                      413 / 2
    ├── Unprocessable                 422 / 5   ran, but what was checked does not hold
    ├── TooManyRequests               429 / 8
    ├── IntegrityFailure              500 / 4   stored bytes or chain do not verify
    └── Unavailable                   503 / 6   a dependency or the service is not there

The engine's ``timeout`` is reported in the result rather than raised; its CLI exit is
124, as with coreutils ``timeout``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RequiemError(Exception):
    """Root of every error Requiem reports to a user."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The error as the API and ``--json`` show it."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(RequiemError):
    code = "invalid_input"
    http_status = 400
    exit_code = 2


class Unauthenticated(RequiemError):
    code = "unauthenticated"
    http_status = 401
    exit_code = 7


class Forbidden(RequiemError):
    code = "forbidden"
    http_status = 403
    exit_code = 7


class NotFound(RequiemError):
    code = "not_found"
    http_status = 404
    exit_code = 3


class Conflict(RequiemError):
    code = "conflict"
    http_status = 409
    exit_code = 8


class TooLarge(RequiemError):
    code = "too_large"
    http_status = 413
    exit_code = 2


class Unprocessable(RequiemError):
    code = "unprocessable"
    http_status = 422
    exit_code = 5


class TooManyRequests(RequiemError):
    code = "too_many_requests"
    http_status = 429
    exit_code = 8


class IntegrityFailure(RequiemError):
    code = "integrity_failed"
    http_status = 500
    exit_code = 4


class Unavailable(RequiemError):
    code = "unavailable"
    http_status = 503
    exit_code = 6


# Errors shared by several layers. Layer-specific ones live beside their layer.


class JsonParseError(InvalidInput):
    code = "json_parse_error"


class JsonDuplicateKey(InvalidInput):
    code = "json_duplicate_key"


class UsageError(InvalidInput):
    code = "usage_error"


class ConfigError(InvalidInput):
    code = "config_error"


class FileMissing(NotFound):
    code = "file_not_found"


class ServerUnreachable(Unavailable):
    code = "server_unreachable"


def all_error_classes() -> list[type[RequiemError]]:
    """Every subclass of RequiemError that has been imported, root included."""
    seen: list[type[RequiemError]] = [RequiemError]
    pending = list(RequiemError.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls not in seen:
            seen.append(cls)
            pending.extend(cls.__subclasses__())
    return seen
