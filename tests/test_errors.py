"""The error tree: one code per class, one status and exit code per code."""

from __future__ import annotations

import importlib
import pkgutil
import re

import requiem
from requiem import errors


def _import_everything() -> None:
    """Import every module so that every error class defined anywhere is seen."""
    for module in pkgutil.walk_packages(requiem.__path__, "requiem."):
        if module.name.endswith("__main__") or ".migrations." in module.name:
            continue
        importlib.import_module(module.name)


def test_every_error_code_is_unique_and_snake_case():
    _import_everything()
    seen: dict[str, type] = {}

    for cls in errors.all_error_classes():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", cls.code), cls
        assert cls.code not in seen, f"{cls} reuses {cls.code!r} of {seen[cls.code]}"
        seen[cls.code] = cls


def test_every_error_maps_to_a_client_status_or_a_server_fault():
    _import_everything()

    for cls in errors.all_error_classes():
        assert 400 <= cls.http_status <= 599, cls
        assert cls.exit_code != 0, cls


def test_to_dict_carries_code_message_and_details():
    error = errors.JsonDuplicateKey("duplicate key 'a'", key="a")

    assert error.to_dict() == {
        "code": "json_duplicate_key",
        "message": "duplicate key 'a'",
        "details": {"key": "a"},
    }
    assert (error.http_status, error.exit_code) == (400, 2)
