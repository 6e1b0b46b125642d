"""The CLI's client for a running server (``REQUIEM_URL``, ``REQUIEM_API_KEY``).

Some commands act on what only the server holds: its connection pool, its unflushed
audit buffer, its live breaker state. They reach it here. Every failure becomes one
RequiemError: the server's own error code when it answered with the API's error
shape, ``server_unreachable`` when nothing answered.
"""

from __future__ import annotations

from typing import Any

import httpx

from requiem import errors
from requiem.settings import Settings

TIMEOUT_S = 10.0


class RemoteError(errors.RequiemError):
    """An error the server reported; carries the server's own code and status."""

    code = "remote_error"

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message, status=status)
        self.code = code  # type: ignore[misc] - the server's code, for this instance
        self.http_status = status  # type: ignore[misc]
        self.exit_code = _exit_for_status(status)  # type: ignore[misc]


def _exit_for_status(status: int) -> int:
    for cls in errors.all_error_classes():
        if cls.http_status == status and cls.__base__ is errors.RequiemError:
            return cls.exit_code
    return 1


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = TIMEOUT_S) -> ApiClient:
        key = settings.get("REQUIEM_API_KEY")
        return cls(str(settings.get("REQUIEM_URL")), str(key) if key else None, timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON body of a successful answer; raises a RequiemError otherwise."""
        url = f"{self.base_url}{path}"
        try:
            response = httpx.request(
                method, url, headers=self._headers, timeout=self.timeout, **kwargs
            )
        except httpx.HTTPError as exc:
            msg = (
                f"no Requiem server reachable at {self.base_url} "
                f"({type(exc).__name__}; the CLI finds it through REQUIEM_URL)"
            )
            raise errors.ServerUnreachable(msg, url=self.base_url) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "code" in error:
            message = str(error.get("message", ""))
            if response.status_code == 401:
                sent = "sent" if self._headers else "found no"
                message += f" (the CLI {sent} REQUIEM_API_KEY)"
            raise RemoteError(str(error["code"]), message, response.status_code)
        msg = f"server answered {response.status_code} for {method} {path}"
        raise RemoteError("http_error", msg, response.status_code)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=json, **kwargs)

    def reachable(self) -> bool:
        try:
            self.get("/api/health")
        except errors.ServerUnreachable:
            return False
        except errors.RequiemError:
            return True
        return True
