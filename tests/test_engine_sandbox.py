"""Probing the sandbox tools for real, and what a run says when one is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest
from requiem.engine.sandbox import probe
from requiem.errors import RequiemError


def config(**overrides: str) -> settings.Settings:
    return settings.load({**os.environ, **overrides})


def test_probe_finds_working_tools_once(home: Path):
    first = probe(config())
    second = probe(config())

    assert second is first
    assert (first.bwrap_works, first.faketime_works, first.rlimits) == (
        True,
        True,
        True,
    )
    assert first.notes == []


def test_a_bwrap_that_fails_is_found_but_not_working(home: Path):
    caps = probe(config(REQUIEM_BWRAP="/bin/false"))

    assert (caps.bwrap_path, caps.bwrap_works) == ("/bin/false", False)
    assert caps.notes == ["bubblewrap at /bin/false does not work here: exit 1"]


def test_without_libfaketime_the_clock_is_reported_not_enforced(home: Path):
    broken = config(REQUIEM_FAKETIME_LIB="/nonexistent/libfaketime.so.1")
    engine = Engine(LocalCAS.from_settings(broken), broken)
    request = ExecutionRequest.parse('{"command": "true"}')
    strict = ExecutionRequest.parse('{"command": "true", "policy": {"mode": "strict"}}')

    result = engine.run(request)
    with pytest.raises(RequiemError) as caught:
        engine.run(strict)

    assert result.ok
    assert result.sandbox_applied["not_enforced"] == ["fixed_clock"]
    assert result.sandbox_applied["clock"] == "real"
    assert caught.value.code == "sandbox_unavailable"
    assert caught.value.message == "strict mode refuses to run without: libfaketime"
