"""Entry point of the `requiem` command.

Every command group lives in its own module and registers itself here. ``main`` turns
any :class:`~requiem.errors.RequiemError` into one line on stderr and its exit code;
an unexpected exception becomes one ``internal_error`` line unless ``--debug`` is
given. The runbook's colon spelling (``requiem audit:flush``, ``db:pool:status``) is
accepted as an alias of the spaced one.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from requiem import log, settings
from requiem.errors import RequiemError

# Top-level command → the module under requiem.cli that registers it. A module is
# imported only when one of its commands runs (or for --help), so `requiem digest`
# does not pay for importing the engine, SQLAlchemy and Alembic. A test keeps this
# table equal to what the modules register.
COMMAND_MODULES: dict[str, str] = {
    "digest": "digest_cmd",
    "cas": "cas_cmd",
    "run": "engine_cmd",
    "exec": "engine_cmd",
    "doctor": "ops_cmd",
    "health": "ops_cmd",
    "verify": "ops_cmd",
    "version": "ops_cmd",
    "db": "db_cmd",
    "env": "env_cmd",
    "serve": "service_cmd",
    "status": "service_cmd",
    "flags": "service_cmd",
    "tenant": "service_cmd",
    "api-key": "service_cmd",
    "audit": "audit_cmd",
}


def module_commands(module_name: str) -> dict[str, Any]:
    """The click commands one ``requiem.cli`` module registers, by name."""
    module = importlib.import_module(f"requiem.cli.{module_name}")
    holder = typer.Typer()
    holder.callback()(lambda: None)  # a callback keeps a lone command in a group
    module.register(holder)
    return dict(typer.main.get_command(holder).commands)  # type: ignore[attr-defined]


class _LazyRoot(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        module_name = COMMAND_MODULES.get(cmd_name)
        if module_name is None:
            return None
        return module_commands(module_name).get(cmd_name)


app = typer.Typer(
    name="requiem",
    cls=_LazyRoot,
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


def _log_level(config: settings.Settings, args: list[str], debug: bool) -> str:
    """The server logs every request at INFO; a one-shot command only what went wrong.

    An explicit REQUIEM_LOG_LEVEL wins for both.
    """
    if debug:
        return "debug"
    if config.is_set("REQUIEM_LOG_LEVEL") or args[:1] == ["serve"]:
        return str(config.get("REQUIEM_LOG_LEVEL"))
    return "warning"


def main(argv: list[str] | None = None) -> None:
    args = expand_colon_alias(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    as_json = "--json" in args

    try:
        config = settings.load()
        log.configure(
            _log_level(config, args, debug), str(config.get("REQUIEM_LOG_FORMAT"))
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
