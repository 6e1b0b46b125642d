"""Attacks on the CAS: damaged blobs and sidecars, racing writers, killed writers.

Every test uses a real CAS directory and, where the user would, the real ``requiem``
command. Tests marked ``xfail(strict=True)`` are bugs found and left for the CAS
owner; each reason names the bug.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from requiem import digest as dg
from requiem import settings
from requiem.cas import gc
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest, ExecutionResult
from requiem.engine.verify import checks_for
from requiem.errors import RequiemError

SMALL = b"small object\n"
MID = bytes(range(256)) * 8  # 2 KiB, not compressible enough to be packed
LARGE = os.urandom(3 << 20)  # above the 1 MiB in-memory bound, stored raw
PACKED = b"hello\n" * (600 << 10)  # above the bound, stored as zstd


def blob(cas: LocalCAS, digest: str) -> Path:
    return cas.blob_path(digest)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def append(path: Path) -> None:
    with open(path, "ab") as out:
        out.write(b"x")


def empty(path: Path) -> None:
    path.write_bytes(b"")


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def host_file(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/bin/sh")


def bad_sidecar(path: Path) -> None:
    Path(f"{path}.meta.json").write_text("{")


def huge_sidecar(path: Path) -> None:
    Path(f"{path}.meta.json").write_bytes(b" " * (1 << 20))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flip": flip,
    "truncate": truncate,
    "append": append,
    "empty": empty,
    "directory": directory,
    "symlink": host_file,
    "bad_sidecar": bad_sidecar,
    "huge_sidecar": huge_sidecar,
}
OBJECTS = {"small": SMALL, "mid": MID, "large": LARGE, "packed": PACKED}


@pytest.fixture
def cas(home: Path) -> LocalCAS:
    return LocalCAS(home / "cas")


@pytest.mark.parametrize("kind", list(OBJECTS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_object_is_reported_and_never_served(
    cas: LocalCAS, tmp_path: Path, kind: str, damage: str
):
    digest = cas.put_bytes(OBJECTS[kind])
    DAMAGE[damage](blob(cas, digest))
    target = tmp_path / "copy"

    for read in (
        lambda: cas.get_bytes(digest),
        lambda: cas.verify_object(digest),
        lambda: cas.get_to_file(digest, target),
    ):
        with pytest.raises(RequiemError) as raised:
            read()
        assert raised.value.code == "cas_integrity_failed"
    assert not target.exists()
    assert list(target.parent.glob(".requiem-get-*")) == []


@pytest.mark.parametrize("stolen", ["sidecar", "sidecar_and_blob"])
def test_sidecar_of_another_object_is_an_integrity_failure(cas: LocalCAS, stolen: str):
    mine, other = cas.put_bytes(SMALL), cas.put_bytes(MID)
    os.replace(cas.meta_path(other), cas.meta_path(mine))
    if stolen == "sidecar_and_blob":
        os.replace(cas.blob_path(other), cas.blob_path(mine))

    with pytest.raises(RequiemError) as raised:
        cas.get_bytes(mine)

    assert raised.value.code == "cas_integrity_failed"


def test_cas_get_of_a_damaged_large_object_writes_no_byte(cli, home: Path):
    cas = LocalCAS(home / "cas")
    digest = cas.put_bytes(LARGE)
    truncate(blob(cas, digest))

    done = subprocess.run(
        [sys.executable, "-m", "requiem", "cas", "get", digest],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip

    assert (done.returncode, done.stdout) == (4, b"")
    assert b"error[cas_integrity_failed]" in done.stderr


def _put_in_child(root: str, path: str) -> str:
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from requiem.cas.store import LocalCAS;"
         "print(LocalCAS(sys.argv[1]).put_file(sys.argv[2]))", root, path],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip


def test_many_processes_putting_one_object_leave_one_good_copy(
    cas: LocalCAS, tmp_path: Path
):
    source = tmp_path / "big"
    source.write_bytes(LARGE)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from requiem.cas.store import LocalCAS;"
                "print(LocalCAS(sys.argv[1]).put_file(sys.argv[2]))",
                str(cas.root),
                str(source),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(8)
    ]
    said = {proc.communicate(timeout=60)[0].strip() for proc in procs}

    assert said == {dg.of_bytes(LARGE)}
    assert cas.verify_object(dg.of_bytes(LARGE)).size == len(LARGE)
    assert list(cas.tmp.iterdir()) == []


def test_writer_killed_mid_put_leaves_nothing_that_verifies_wrong(
    cas: LocalCAS, tmp_path: Path
):
    source = tmp_path / "big"
    source.write_bytes(os.urandom(48 << 20))
    cas.ensure()
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from requiem.cas.store import LocalCAS;"
         "LocalCAS(sys.argv[1]).put_file(sys.argv[2])",
         str(cas.root), str(source)],
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not any(cas.tmp.iterdir()) and writer.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    for digest in cas.iter_digests():
        if cas.exists(digest):
            cas.verify_object(digest)
    assert _put_in_child(str(cas.root), str(source)) == dg.of_file(source)
    assert cas.verify_object(dg.of_file(source)).size == 48 << 20


def _engine() -> Engine:
    config = settings.load(dict(os.environ))
    return Engine(LocalCAS.from_settings(config), config)


def _failed_checks_after_gc(engine: Engine, result: ExecutionResult) -> list[str]:
    gc.collect(engine.cas, grace_s=0, now=time.time() + 1)
    return [c.name for c in checks_for(result, engine.cas) if not c.ok]


def test_gc_keeps_everything_a_cached_result_references(home: Path, tmp_path: Path):
    (tmp_path / "in.txt").write_text("input\n")
    engine = _engine()
    request = ExecutionRequest.from_mapping(
        {
            "command": "sh",
            "argv": ["-c", "cat in.txt > out.txt; echo out; echo err >&2"],
            "workspace_root": str(tmp_path),
            "outputs": ["out.txt"],
        }
    )
    result = engine.run(request)

    assert _failed_checks_after_gc(engine, result) == []


def test_gc_keeps_what_an_uncached_stored_result_references(home: Path):
    """Every stored result is a root: wall-clock runs are never cached, yet kept."""
    engine = _engine()
    request = ExecutionRequest.from_mapping(
        {
            "command": "sh",
            "argv": ["-c", "echo wall"],
            "policy": {"time_mode": "wall_clock"},
        }
    )
    result = engine.run(request)

    assert _failed_checks_after_gc(engine, result) == []


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _endless_device(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(
    ("content", "replace"),
    [
        pytest.param(
            SMALL,
            _fifo,
            id="fifo",
        ),
        pytest.param(
            LARGE,
            _endless_device,
            id="dev-zero",
        ),
    ],
)
def test_blob_replaced_by_a_special_file_is_reported_not_waited_on(
    cli, home: Path, content: bytes, replace: Callable[[Path], None]
):
    cas = LocalCAS(home / "cas")
    digest = cas.put_bytes(content)
    replace(blob(cas, digest))

    done = subprocess.run(
        [sys.executable, "-m", "requiem", "cas", "get", digest],
        capture_output=True, timeout=4, check=False,
    )  # fmt: skip

    assert done.returncode == 4
    assert b"error[cas_integrity_failed]" in done.stderr


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_cas_put_on_a_full_disk_has_its_own_error(home: Path, tmp_path: Path):
    source = tmp_path / "big"
    source.write_bytes(LARGE)

    # RLIMIT_FSIZE makes the write fail (EFBIG) as a full disk would (ENOSPC).
    done = subprocess.run(
        [sys.executable, "-m", "requiem", "cas", "put", str(source)],
        capture_output=True, preexec_fn=_limit_file_size, timeout=60, check=False,
    )  # fmt: skip

    assert b"Traceback" not in done.stderr
    assert done.returncode not in (0, 1)
    assert b"error[internal_error]" not in done.stderr
