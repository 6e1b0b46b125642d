"""Snapshots of host directories and copying outputs back into them."""

from __future__ import annotations

from pathlib import Path

import pytest

from requiem import digest as dg
from requiem import settings
from requiem.cas.store import LocalCAS
from requiem.engine.workspace import copy_outputs_back, snapshot
from requiem.errors import RequiemError


@pytest.fixture
def cas(home: Path) -> LocalCAS:
    return LocalCAS.from_settings(settings.load())


def test_snapshot_skips_tool_directories_and_follows_inner_symlinks(
    cas: LocalCAS, tmp_path: Path
):
    for skipped in (".git", ".venv", ".requiem", "sub/.git"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "x").write_text("skipped")
    (tmp_path / "sub" / "real.txt").write_text("real\n")
    (tmp_path / "alias.txt").symlink_to("sub/real.txt")
    (tmp_path / "subdir-link").symlink_to("sub")

    found = snapshot(cas, tmp_path)

    digest = dg.of_bytes(b"real\n")
    assert found == {"alias.txt": digest, "sub/real.txt": digest}
    assert cas.get_bytes(digest) == b"real\n"


def test_snapshot_refuses_a_symlinked_directory_leading_outside(
    cas: LocalCAS, tmp_path: Path
):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "etc").symlink_to("/etc")

    with pytest.raises(RequiemError) as caught:
        snapshot(cas, tmp_path / "ws")

    assert caught.value.code == "path_escape"


def test_copy_back_over_a_directory_is_output_not_writable(
    cas: LocalCAS, tmp_path: Path
):
    digest = cas.put_bytes(b"made\n")
    (tmp_path / "out").mkdir()

    with pytest.raises(RequiemError) as caught:
        copy_outputs_back(cas, {"out": digest}, tmp_path)

    assert (caught.value.code, caught.value.http_status) == ("output_not_writable", 409)


def test_copy_back_through_a_symlink_leading_outside_is_a_path_escape(
    cas: LocalCAS, tmp_path: Path
):
    digest = cas.put_bytes(b"made\n")
    (tmp_path / "ws").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ws" / "dist").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(RequiemError) as caught:
        copy_outputs_back(cas, {"dist/app": digest}, tmp_path / "ws")

    assert caught.value.code == "path_escape"
    assert not (tmp_path / "elsewhere" / "app").exists()


def test_snapshot_leaves_out_the_cas_and_the_state_directory_inside_it(
    tmp_path: Path,
):
    cas = LocalCAS(tmp_path / "objects-here")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "requiem.db").write_text("not an input")
    (tmp_path / "main.c").write_text("int main(void) { return 0; }\n")

    found = snapshot(cas, tmp_path, skip_dirs=(tmp_path / "state",))

    assert list(found) == ["main.c"]


def test_copied_back_programs_are_executable_and_data_is_not(
    cas: LocalCAS, tmp_path: Path
):
    program = cas.put_bytes(b"\x7fELF" + b"\x00" * 60)
    script = cas.put_bytes(b"#!/bin/sh\necho hi\n")
    data = cas.put_bytes(b"plain text\n")

    target = tmp_path / "ws"
    target.mkdir()
    copy_outputs_back(cas, {"app": program, "run.sh": script, "notes": data}, target)

    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes == {"app": 0o755, "run.sh": 0o755, "notes": 0o644}
