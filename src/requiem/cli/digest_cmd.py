"""``requiem digest``: plain BLAKE3 of files or stdin, and ``digest verify``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from requiem import digest as dg
from requiem.cli import output
from requiem.errors import FileMissing, UsageError


def register(app: typer.Typer) -> None:
    app.command(
        "digest",
        help=(
            "Print the BLAKE3 of each FILE (or stdin) as `digest  path`, like b3sum. "
            "`requiem digest verify --result R` recomputes every digest in a stored "
            "result."
        ),
    )(digest)


def digest(
    paths: Annotated[list[str] | None, typer.Argument(help="Files to hash.")] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Hash standard input.")
    ] = False,
    result: Annotated[
        Path | None, typer.Option("--result", help="With `verify`: a result JSON file.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output.")
    ] = False,
) -> None:
    paths = list(paths or [])
    if paths[:1] == ["verify"]:
        if result is None or len(paths) > 1:
            msg = "usage: requiem digest verify --result RESULT.json"
            raise UsageError(msg)
        from requiem.engine.verify import verify_result_file

        raise typer.Exit(verify_result_file(result, as_json=as_json))
    if result is not None:
        msg = "--result is only valid with `requiem digest verify`"
        raise UsageError(msg)
    if stdin == bool(paths):
        msg = "give either --stdin or one or more FILEs"
        raise UsageError(msg)

    if stdin:
        value = dg.of_stream(sys.stdin.buffer)
        if as_json:
            output.print_json({"digest": value, "path": "-"})
        else:
            output.line(value)
        return

    rows = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            msg = f"no such file: {name}"
            raise FileMissing(msg, path=name)
        rows.append({"digest": dg.of_file(path), "path": name})
        if not as_json:
            output.line(f"{rows[-1]['digest']}  {name}")
    if as_json:
        output.print_json(rows)
