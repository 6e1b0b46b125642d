"""Structured logging to stderr: one event name plus fields, never a secret.

stdout belongs to a command's output (and to MCP over stdio), so every log line goes
to stderr.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_SECRET_FIELD = re.compile(
    r"(token|secret|password|passwd|credential|api_key|apikey|authorization|cookie"
    r"|private_key|signing_key)",
    re.IGNORECASE,
)
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Replace the value of any field whose name looks like a secret."""
    for key in list(event):
        if key != "event" and _SECRET_FIELD.search(key):
            event[key] = "[redacted]"
    return event


class _StderrLogger:
    """Writes each rendered line to whatever ``sys.stderr`` is at that moment.

    structlog's own print logger keeps the stream it was given; a test harness (or a
    daemon) that swaps stderr would then write into a closed file.
    """

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure(level: str = "info", fmt: str = "console") -> None:
    """Route structlog to stderr at ``level`` in ``fmt`` (console or json)."""
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        # Plain tracebacks: the default one prints each frame's local variables,
        # which near a request include its Authorization header.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            *([structlog.processors.format_exc_info] if fmt == "json" else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=max(_LEVELS.get(level, 20), 30))


def get(name: str) -> Any:
    return structlog.get_logger(name)


# Library use without the CLI (tests, an embedding program) must never log to stdout.
configure()
