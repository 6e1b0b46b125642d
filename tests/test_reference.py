"""README.md and docs/errors.md list exactly the settings and error codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from requiem import reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("relative", sorted(reference.SECTIONS))
def test_generated_tables_are_current(relative):
    text = (ROOT / relative).read_text()

    expected = text
    for name, make in reference.SECTIONS[relative].items():
        expected = reference.render(expected, name, make())

    assert text == expected, "run: .venv/bin/python -m requiem.reference"


def test_render_refuses_a_file_without_its_markers():
    with pytest.raises(ValueError, match="section marker"):
        reference.render("no markers here", "settings", "x")
