"""``requiem run``, ``requiem exec run`` and ``requiem exec replay``.

``run`` and ``exec run`` end with the child's exit code (124 on timeout, 127 when
the command could not be started); an error the run recorded — a timeout, a missing
output — is also said as one ``requiem: error[<code>]`` line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.cli import output
from requiem.engine import Engine, ExecutionRequest, ExecutionResult
from requiem.engine.errors import RESULT_ERRORS, DriftDetected, OutputNotWritable
from requiem.engine.models import MAX_REQUEST_BYTES
from requiem.engine.verify import load_result
from requiem.engine.workspace import copy_outputs_back
from requiem.errors import FileMissing, UsageError

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Run even if the action cache has it.")
]

exec_app = typer.Typer(
    help="Run a request file, or replay a result file and report drift.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        context_settings={"allow_interspersed_args": False},
        help=(
            "Run CMD deterministically on a snapshot of the workspace (default: "
            "the current directory, without .requiem, .git, .venv); declared "
            "outputs are copied back. Exits with CMD's exit code (124 on timeout)."
        ),
    )(run)
    exec_app.command("run")(exec_run)
    exec_app.command("replay")(exec_replay)
    app.add_typer(exec_app, name="exec")


def _engine() -> Engine:
    config = settings.load()
    return Engine(LocalCAS.from_settings(config), config)


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for number, pair in enumerate(pairs, start=1):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            # The text is not repeated: a pasted token must not reach the terminal.
            msg = f"--env wants NAME=VALUE; --env number {number} is not of that form"
            raise UsageError(msg)
        env[name] = value
    return env


def _exit_code(result: ExecutionResult) -> int:
    """The child's exit code, or the recorded error's when the child said 0."""
    if result.error_code is not None:
        cls = RESULT_ERRORS.get(result.error_code)
        message = " ".join((result.error_message or result.error_code).split())
        sys.stderr.write(f"requiem: error[{result.error_code}]: {message}\n")
        if result.exit_code == 0 and cls is not None:
            return cls.exit_code
    return result.exit_code


def _summary(result: ExecutionResult) -> dict[str, Any]:
    said = result.termination_reason
    if result.error_code:
        said = f"{said} ({result.error_code})"
    return {
        "exit code": result.exit_code,
        "termination": said,
        "request digest": result.request_digest,
        "result digest": result.result_digest,
        "stdout": f"{result.stdout_digest} ({result.stdout_size} bytes)",
        "stderr": f"{result.stderr_digest} ({result.stderr_size} bytes)",
        **{f"output {p}": d for p, d in sorted(result.output_digests.items())},
        "cache hit": "yes" if result.cache_hit else "no",
        "duration": f"{result.duration_ms} ms",
        "not enforced": ", ".join(result.sandbox_applied.get("not_enforced", []))
        or "-",
    }


def _summary_lines(result: ExecutionResult) -> list[str]:
    rows = _summary(result)
    width = max(len(name) for name in rows)
    return [f"{name:>{width}}: {value}" for name, value in rows.items()]


def run(
    command: Annotated[
        list[str], typer.Argument(help="The program and its arguments, after --.")
    ],
    workspace: Annotated[
        Path | None, typer.Option("--workspace", help="Directory to snapshot.")
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option("--output", help="Workspace-relative file to capture."),
    ] = None,
    timeout_ms: Annotated[int, typer.Option("--timeout-ms", min=1)] = 60_000,
    no_cache: NoCache = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse to run unsandboxed.")
    ] = False,
    wall_clock: Annotated[
        bool, typer.Option("--wall-clock", help="Let the child read the real clock.")
    ] = False,
    ro: Annotated[
        list[str] | None,
        typer.Option("--ro", help="Host path the sandbox may read (repeatable)."),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="NAME=VALUE for the child.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run CMD on a snapshot of the workspace; print the result."""
    root = (workspace or Path.cwd()).absolute()
    raw = {
        "command": command[0],
        "argv": command[1:],
        "env": _env_pairs(env or []),
        "workspace_root": str(root),
        "outputs": list(outputs or []),
        "timeout_ms": timeout_ms,
        "policy": {
            "mode": "strict" if strict else "default",
            "time_mode": "wall_clock" if wall_clock else "fixed",
            "ro_paths": [os.path.abspath(path) for path in ro or []],
        },
    }
    request = ExecutionRequest.from_mapping(raw)
    engine = _engine()
    result = engine.run(request, use_cache=not no_cache)
    copy_outputs_back(engine.cas, result.output_digests, root)

    if as_json:
        output.print_json(result.model_dump(mode="json"))
    else:
        sys.stdout.flush()
        engine.cas.get_to_stream(result.stdout_digest, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        engine.cas.get_to_stream(result.stderr_digest, sys.stderr.buffer)
        sys.stderr.buffer.flush()
        for text in _summary_lines(result):
            output.note(text)
    raise typer.Exit(_exit_code(result))


def _read_request(path: str) -> bytes:
    """The request file's bytes (``-``: stdin), reading no more than the limit."""
    if path == "-":
        return sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    if not os.path.isfile(path):
        msg = f"no such request file: {path}"
        raise FileMissing(msg, path=path)
    with open(path, "rb") as stream:
        return stream.read(MAX_REQUEST_BYTES + 1)


def _check_out_path(path: Path) -> None:
    """UsageError before anything runs when ``--out`` cannot name a new file."""
    target = path.absolute()
    if not target.parent.is_dir():
        msg = f"--out {path}: directory {target.parent} does not exist"
        raise UsageError(msg, path=str(path))
    if target.is_dir():
        msg = f"--out {path} is a directory; name a file"
        raise UsageError(msg, path=str(path))


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file; OutputNotWritable if refused."""
    target = path.absolute()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        msg = f"cannot write the result to {path}: {exc.strerror}"
        raise OutputNotWritable(msg, path=str(path)) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def exec_run(
    request_file: Annotated[
        str, typer.Option("--request", help="Request JSON file (- for stdin).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the result JSON here.")
    ] = None,
    no_cache: NoCache = False,
    as_json: JsonFlag = False,
) -> None:
    """Run a request file; exit with the child's exit code (124 on timeout)."""
    if out is not None:
        _check_out_path(out)
    request = ExecutionRequest.parse(_read_request(request_file))
    result = _engine().run(request, use_cache=not no_cache)
    document = result.model_dump(mode="json")
    if out is not None:
        _write_atomically(out, json.dumps(document, indent=2, sort_keys=True) + "\n")
    if as_json:
        output.print_json(document)
    else:
        for text in _summary_lines(result):
            output.line(text)
    raise typer.Exit(_exit_code(result))


def exec_replay(
    result_file: Annotated[
        Path, typer.Option("--result", help="Result JSON written by exec run.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Run a result's request again; exit 0 if identical, 5 (drift) if not."""
    stored = load_result(result_file)
    report = _engine().replay(stored)
    if not report.ok:
        first = report.differences[0]
        names = ", ".join(d.field for d in report.differences)
        msg = f"replay differs in {names}; first: {first.describe()}"
        raise DriftDetected(
            msg,
            differences=[d._asdict() for d in report.differences],
            replayed_result_digest=report.replayed.result_digest,
        )
    if as_json:
        output.print_json(report.to_dict())
    else:
        output.line(f"identical: result {report.replayed.result_digest}")
