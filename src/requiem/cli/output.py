"""How every command speaks: results on stdout, everything else on stderr.

A command prints its result either as JSON (``--json``, for machines) or as a table or
a line for people. Progress bars, notes and errors go to stderr so that stdout stays
exactly the command's output (``NEW_KEY=$(requiem api-key generate …)`` relies on it).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
UNCUT_WIDTH = 10_000


def print_json(value: Any) -> None:
    """One JSON document on stdout, keys sorted, newline-terminated."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def line(text: str) -> None:
    """One plain line on stdout (no markup interpretation)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A line for the person at the terminal, on stderr."""
    err.print(text, markup=False)


def table(
    title: str | None,
    columns: list[str],
    rows: list[list[Any]],
    whole: tuple[str, ...] = (),
) -> None:
    """Rows under ``columns``; cells of the ``whole`` columns are never cut.

    Ids, digests and timestamps must survive a pipe or a narrow terminal intact, so
    they can be pasted into the next command: when the table is wider than the
    console it is printed at its natural width instead of being squeezed.
    """
    grid = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, no_wrap=column in whole)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    console = out
    if whole:
        natural = Measurement.get(out, out.options.update_width(UNCUT_WIDTH), grid)
        if natural.maximum > out.width:
            console = Console(
                file=out.file,
                width=natural.maximum,
                highlight=False,
                force_terminal=out.is_terminal,
                color_system=out.color_system,  # type: ignore[arg-type]
            )
    console.print(grid)


def key_values(pairs: dict[str, Any], title: str | None = None) -> None:
    """A two-column table of ``name  value`` pairs."""
    table(title, ["", ""], [[k, v] for k, v in pairs.items()])
