"""Entry point of the `requiem` command.

Every command group lives in its own module and registers itself here. ``main`` turns
any :class:`~requiem.errors.RequiemError` into one line on stderr and its exit code;
an unexpected exception becomes one ``internal_error`` line unless ``--debug`` is
given. The runbook's colon spelling (``requiem audit:flush``, ``db:pool:status``) is
accepted as an alias of the spaced one.
"""

from __future__ import annotations

import json
import sys

import typer

from requiem import log, settings
from requiem.cli import (
    audit_cmd,
    cas_cmd,
    db_cmd,
    digest_cmd,
    engine_cmd,
    env_cmd,
    ops_cmd,
    service_cmd,
)
from requiem.errors import RequiemError

app = typer.Typer(
    name="requiem",
    help="Run commands so the same request always gives the same, provable answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Run commands so that the same request always gives the same, provable answer.

    Global flag: --debug shows a traceback for unexpected errors.
    """


for module in (
    digest_cmd,
    cas_cmd,
    engine_cmd,
    ops_cmd,
    db_cmd,
    env_cmd,
    service_cmd,
    audit_cmd,
):
    module.register(app)


def expand_colon_alias(args: list[str]) -> list[str]:
    """``audit:flush --x`` → ``audit flush --x``; only the first word is split."""
    if args and ":" in args[0] and not args[0].startswith("-"):
        return args[0].split(":") + args[1:]
    return args


def _fail(exc: RequiemError, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(json.dumps({"ok": False, "error": exc.to_dict()}) + "\n")
    message = " ".join(exc.message.split())
    sys.stderr.write(f"requiem: error[{exc.code}]: {message}\n")
    return exc.exit_code


def _is_usage_error(exc: Exception) -> bool:
    """Click's errors (typer may vendor its own copy of click, so match by shape)."""
    return hasattr(exc, "format_message") and hasattr(exc, "exit_code")


def _usage(exc: Exception) -> int:
    text = exc.format_message()  # type: ignore[attr-defined]
    if type(exc).__name__ == "NoArgsIsHelpError":
        sys.stderr.write(text + "\n")
        return 2
    sys.stderr.write(f"requiem: error[usage_error]: {' '.join(text.split())}\n")
    return int(getattr(exc, "exit_code", 2) or 2)


def main(argv: list[str] | None = None) -> None:
    args = expand_colon_alias(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    as_json = "--json" in args

    try:
        config = settings.load()
        log.configure(
            "debug" if debug else str(config.get("REQUIEM_LOG_LEVEL")),
            str(config.get("REQUIEM_LOG_FORMAT")),
        )
    except RequiemError as exc:
        log.configure()
        sys.exit(_fail(exc, as_json))

    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="requiem", standalone_mode=False)
    except RequiemError as exc:
        if debug:
            raise
        code = _fail(exc, as_json)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("requiem: interrupted\n")
        code = 130
    except BrokenPipeError:
        code = 141
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if _is_usage_error(exc):
            code = _usage(exc)
        elif debug:
            raise
        else:
            kind = type(exc).__name__
            sys.stderr.write(
                f"requiem: error[internal_error]: {kind}: {exc} (rerun with --debug)\n"
            )
            code = 1
    sys.exit(code if isinstance(code, int) else 0)
