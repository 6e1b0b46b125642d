"""The execution contract: request, policy and result as strict pydantic models.

A request is parsed strictly (no duplicate keys, no unknown fields, no type
coercion) and normalised as it is validated: paths are cleaned, outputs sorted and
deduplicated. What a digest covers is decided here too:

* ``request_digest`` is ``of_record("req", request.canonical())``: everything that
  decides what runs — command, argv, the (filtered) env, cwd, inputs, outputs,
  limits, nonce, tenant and policy. Not ``request_id`` (a label for one submission)
  and not ``workspace_root`` (its snapshot's input digests stand for it, so the
  caller's absolute path never counts).
* ``result_digest`` is ``of_record("res", result.reproducible())``: request digest,
  exit code, termination reason, error code, stream and output digests and the trace
  digest. Never previews, durations, memory, sandbox facts, host paths or names.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from requiem import digest as dg
from requiem.engine.errors import (
    InvalidPolicy,
    InvalidRequest,
    InvalidRequestId,
    RequestTooLarge,
    TooManyOutputs,
)
from requiem.engine.paths import clean_relpath
from requiem.errors import InvalidInput

MAX_REQUEST_BYTES = 1 << 20
MAX_OUTPUTS = 256
MAX_PREVIEW_BYTES = 16 << 20
MAX_TIMEOUT_MS = 24 * 3600 * 1000
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# An environment name, or a glob over names in env_allow/env_deny/env_required.
ENV_NAME = re.compile(r"[^=\x00]{1,256}")
# Mount points the sandbox makes itself; a read-only host path may not cover them.
SANDBOX_OWNED = ("/workspace", "/proc", "/dev", "/etc")
# The sandbox's /tmp is a private tmpfs; host paths below it (a checkout or a
# virtualenv under /tmp) can still be bound read-only into it, but /tmp itself cannot.
SANDBOX_PRIVATE_TMP = "/tmp"


def _utf8_only(value: Any, where: str) -> None:
    """InvalidRequest when a string (key or value) holds a lone surrogate.

    JSON's ``\\ud800`` escape and a non-UTF-8 file name both reach Python as
    such strings; they cannot be passed to a process or digested, so they are
    refused here instead of failing later.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            msg = f"{where} is not valid UTF-8 text"
            raise InvalidRequest(msg, field=where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _utf8_only(key, f"{where} key")
            _utf8_only(item, f"{where}.{key}" if isinstance(key, str) else where)
    elif isinstance(value, list):
        for item in value:
            _utf8_only(item, where)


def _no_nul(values: list[str], what: str) -> list[str]:
    for value in values:
        if "\x00" in value:
            msg = f"{what} must not contain NUL bytes"
            raise InvalidRequest(msg, field=what)
    return values


class Policy(BaseModel):
    """How strictly a request runs; every field has a deterministic default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mode: Literal["default", "strict"] = "default"
    time_mode: Literal["fixed", "wall_clock"] = "fixed"
    env_allow: list[str] | None = None
    env_deny: list[str] = Field(default_factory=list)
    env_required: list[str] = Field(default_factory=list)
    sandbox: bool = True
    max_memory_bytes: int | None = Field(default=None, ge=1 << 20)
    max_fds: int | None = Field(default=1024, ge=16, le=1 << 20)
    max_cpu_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    network: Literal["none", "host"] = "none"
    ro_paths: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("env_allow", "env_deny", "env_required")
    @classmethod
    def _env_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not ENV_NAME.fullmatch(name):
                msg = f"environment name or pattern {name[:80]!r} is not valid"
                raise ValueError(msg)
        return sorted(set(value))

    @field_validator("ro_paths")
    @classmethod
    def _host_paths(cls, value: list[str]) -> list[str]:
        cleaned = []
        for path in value:
            if "\x00" in path or not path.startswith("/"):
                msg = f"ro_paths entry {path[:80]!r} must be an absolute host path"
                raise ValueError(msg)
            normal = os.path.normpath(path)
            if normal == "/":
                msg = "ro_paths may not expose the whole host filesystem ('/')"
                raise ValueError(msg)
            owned = [
                p for p in SANDBOX_OWNED if normal == p or normal.startswith(p + "/")
            ]
            if normal == SANDBOX_PRIVATE_TMP:
                owned.append(SANDBOX_PRIVATE_TMP)
            if owned:
                msg = f"ro_paths entry {normal!r} lies in the sandbox's own {owned[0]}"
                raise ValueError(msg)
            cleaned.append(normal)
        return sorted(set(cleaned))

    @model_validator(mode="after")
    def _strict_needs_sandbox(self) -> Policy:
        if self.mode == "strict" and not self.sandbox:
            msg = "strict mode needs the sandbox; sandbox=false contradicts it"
            raise ValueError(msg)
        return self


class ExecutionRequest(BaseModel):
    """One command to run; see the module docstring for what its digest covers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    request_id: str | None = None
    command: str = Field(min_length=1, max_length=4096)
    argv: list[str] = Field(default_factory=list, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = "."
    workspace_root: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list)
    timeout_ms: int = Field(default=60_000, ge=1, le=MAX_TIMEOUT_MS)
    max_output_bytes: int = Field(default=65_536, ge=0, le=MAX_PREVIEW_BYTES)
    nonce: str | None = Field(default=None, max_length=256)
    tenant_id: str | None = Field(default=None, max_length=128)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, value: str | None) -> str | None:
        if value is not None and not REQUEST_ID.fullmatch(value):
            msg = "request_id must be 1-128 characters of A-Z a-z 0-9 _ -"
            raise InvalidRequestId(msg)
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        return _no_nul([value], "command")[0]

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        return _no_nul(value, "argv")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not ENV_NAME.fullmatch(name) or "\x00" in text:
                msg = f"env entry {name[:80]!r} is not a valid variable"
                raise InvalidRequest(msg, field="env")
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str) -> str:
        return clean_relpath(value, "cwd", allow_dot=True)

    @field_validator("workspace_root")
    @classmethod
    def _workspace_root(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\x00" in value):
            msg = "workspace_root must be a directory path"
            raise InvalidRequest(msg, field="workspace_root")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, str]) -> dict[str, str]:
        cleaned: dict[str, str] = {}
        for path, digest in value.items():
            key = clean_relpath(path, "inputs")
            if not dg.is_digest(digest):
                msg = f"inputs[{key!r}] is not a digest (64 lowercase hex)"
                raise InvalidRequest(msg, field="inputs", path=key)
            if key in cleaned:
                msg = f"inputs name {key!r} twice"
                raise InvalidRequest(msg, field="inputs", path=key)
            cleaned[key] = digest
        _refuse_file_under_file(cleaned)
        return dict(sorted(cleaned.items()))

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_OUTPUTS:
            msg = f"{len(value)} outputs declared; at most {MAX_OUTPUTS} are allowed"
            raise TooManyOutputs(msg, count=len(value))
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted({clean_relpath(v, "outputs") for v in value})
        return value

    @classmethod
    def parse(cls, raw: bytes | str | dict[str, Any]) -> ExecutionRequest:
        """Strict JSON → request; InvalidInput subclasses name what is wrong.

        An already-parsed mapping is accepted too (it skips the size check).
        """
        if isinstance(raw, dict):
            return cls.from_mapping(raw)
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > MAX_REQUEST_BYTES:
            msg = f"request is {size} bytes; the limit is {MAX_REQUEST_BYTES}"
            raise RequestTooLarge(msg, size=size, limit=MAX_REQUEST_BYTES)
        return cls.from_mapping(dg.parse_json(raw))

    @classmethod
    def from_mapping(cls, value: Any) -> ExecutionRequest:
        """Validate an already-parsed JSON value, mapping schema errors to codes."""
        if not isinstance(value, dict):
            msg = "a request is a JSON object"
            raise InvalidRequest(msg)
        for name, item in value.items():
            _utf8_only(name, "a request key")
            _utf8_only(item, str(name))
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise _schema_error(exc) from None

    def canonical(self) -> dict[str, Any]:
        """What ``request_digest`` covers (no request_id, no workspace_root)."""
        return self.model_dump(mode="json", exclude={"request_id", "workspace_root"})

    def digest(self) -> str:
        return dg.of_record("req", self.canonical())


def _refuse_file_under_file(inputs: dict[str, str]) -> None:
    """``a`` and ``a/b`` cannot both be files."""
    names = set(inputs)
    for name in names:
        parent = name.rpartition("/")[0]
        while parent:
            if parent in names:
                msg = f"inputs name {parent!r} as a file and as a directory"
                raise InvalidRequest(msg, field="inputs", path=parent)
            parent = parent.rpartition("/")[0]


def _schema_error(exc: ValidationError) -> InvalidInput:
    """The first pydantic error as one clear line with the right code."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    text = f"{where}: {first['msg']}"
    if first["loc"] and first["loc"][0] == "policy":
        return InvalidPolicy(text, field=where)
    return InvalidRequest(text, field=where)


class ExecutionResult(BaseModel):
    """What one run produced; see the module docstring for what is digested."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    exit_code: int
    error_code: str | None = None
    error_message: str | None = None
    termination_reason: Literal["exited", "timeout", "spawn_failed"]
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_size: int = 0
    stderr_size: int = 0
    request_id: str | None = None
    request_digest: str
    request_blob: str | None = None
    stdout_digest: str
    stderr_digest: str
    output_digests: dict[str, str] = Field(default_factory=dict)
    trace_digest: str
    result_digest: str
    trace_events: list[dict[str, Any]] = Field(default_factory=list)
    policy_applied: dict[str, Any] = Field(default_factory=dict)
    sandbox_applied: dict[str, Any] = Field(default_factory=dict)
    cache_hit: bool = False
    result_blob: str | None = None
    duration_ms: int = 0
    peak_memory_bytes: int | None = None
    request: dict[str, Any]

    def reproducible(self) -> dict[str, Any]:
        """The fields ``result_digest`` covers."""
        return {
            "request_digest": self.request_digest,
            "exit_code": self.exit_code,
            "termination_reason": self.termination_reason,
            "error_code": self.error_code,
            "stdout_digest": self.stdout_digest,
            "stderr_digest": self.stderr_digest,
            "output_digests": self.output_digests,
            "trace_digest": self.trace_digest,
        }

    def stored(self) -> dict[str, Any]:
        """The result as kept in the CAS: no per-submission or cache fields."""
        body = self.model_dump(
            mode="json", exclude={"cache_hit", "result_blob", "request_id"}
        )
        return {"kind": "requiem.result", **body}
