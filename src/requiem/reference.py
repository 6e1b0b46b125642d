"""Reference tables generated from the code: every setting and every error code.

``python -m requiem.reference`` rewrites the marked sections of README.md and
docs/errors.md; a test fails when they no longer match the code, so the documentation
cannot drift from what the program reads and reports.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import requiem
from requiem import errors, settings

BEGIN = "<!-- generated:{name} -->"
END = "<!-- end:{name} -->"


def _import_all_modules() -> None:
    for module in pkgutil.walk_packages(requiem.__path__, "requiem."):
        if module.name.endswith("__main__") or ".migrations." in module.name:
            continue
        importlib.import_module(module.name)


def settings_markdown() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in settings.TABLE:
        default = f"`{setting.default}`" if setting.default is not None else "—"
        meaning = setting.help.replace("|", "\\|")
        if setting.secret:
            meaning += " *(secret: never printed)*"
        rows.append(f"| `{setting.name}` | {default} | {meaning} |")
    return "\n".join(rows)


def errors_markdown() -> str:
    _import_all_modules()
    classes = sorted(
        errors.all_error_classes(), key=lambda c: (c.exit_code, c.http_status, c.code)
    )
    rows = ["| code | HTTP | exit | raised by |", "|---|---|---|---|"]
    for cls in classes:
        layer = cls.__module__.removeprefix("requiem.")
        rows.append(f"| `{cls.code}` | {cls.http_status} | {cls.exit_code} | {layer} |")
    return "\n".join(rows)


SECTIONS = {
    "README.md": {"settings": settings_markdown},
    "docs/errors.md": {"errors": errors_markdown},
}


def render(text: str, name: str, body: str) -> str:
    """``text`` with the marked section ``name`` replaced by ``body``."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    head, found, rest = text.partition(begin)
    if not found:
        msg = f"section marker {begin} not found"
        raise ValueError(msg)
    _, found, tail = rest.partition(end)
    if not found:
        msg = f"section marker {end} not found"
        raise ValueError(msg)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(root: Path) -> int:
    for relative, sections in SECTIONS.items():
        path = root / relative
        text = path.read_text()
        for name, make in sections.items():
            text = render(text, name, make())
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()))
