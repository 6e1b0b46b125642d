"""CAS benchmark: speed against plain BLAKE3 + file I/O, small-object rates, memory.

Prints measured numbers and the goals beside them; asserts nothing. Every ratio is
measured in one run on the same data, so a busy machine slows both sides alike.

    .venv/bin/python bench/bench_cas.py --quick      # < 1 minute
    .venv/bin/python bench/bench_cas.py              # full: up to 256 MiB blobs, 4 GiB
    .venv/bin/python bench/bench_cas.py --objects 1000000 --only memory

Sections (``--only`` picks some): ``blobs`` (put/get of 1 MiB … 256 MiB against
BLAKE3 + write/read), ``small`` (4 KiB puts and gets per second), ``verify`` (``cas
verify --all`` against b3sum on the same files), ``memory`` (peak RSS growth of a
4 GiB put and get, and of verify/export over many objects, each in a child process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import blake3

from requiem.cas import scan
from requiem.cas.store import CHUNK, LocalCAS

MIB = 1 << 20
SMALL = 4096


def _row(name: str, value: str, goal: str = "") -> None:
    print(f"  {name:<46} {value:>16}  {goal}", flush=True)


def _data_file(path: Path, size: int, kind: str) -> Path:
    """``size`` bytes of random or compressible (text-like) data."""
    rng = random.Random(size)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
        for _ in range(2000)
    ]
    with open(path, "wb") as out:
        left = size
        while left > 0:
            if kind == "random":
                block = os.urandom(min(left, 8 * MIB))
            else:
                line = b" ".join(rng.choices(words, k=200000)) + b"\n"
                block = line[: min(left, len(line))]
            out.write(block)
            left -= len(block)
    return path


def _timed(action) -> float:  # noqa: ANN001
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _baseline(source: Path, target: Path, *, durable: bool) -> None:
    """Plain BLAKE3 while copying the file (then fsync for a put's durability):
    the least a put or a verified get must do."""
    hasher = blake3.blake3(max_threads=1)
    with open(source, "rb") as src, open(target, "wb") as out:
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
        out.flush()
        if durable:
            os.fsync(out.fileno())
    hasher.hexdigest()


def _best(action, reps: int, between=None) -> float:  # noqa: ANN001
    """The fastest of ``reps`` timed runs (``between`` runs untimed after each)."""
    times = []
    for _ in range(reps):
        times.append(_timed(action))
        if between is not None:
            between()
    return min(times)


def bench_blobs(work: Path, sizes: list[int]) -> None:
    print("put/get of large blobs, best of several runs")
    print("(ratio = baseline time / CAS time; 1.00x is as fast as the baseline)")
    for kind in ("random", "compressible"):
        for size in sizes:
            reps = max(3, 64 // size)
            cas = LocalCAS(work / f"blobs-{kind}-{size}")
            source = _data_file(work / "source", size * MIB, kind)
            copy, back = work / "copy", work / "back"
            digest = cas.put_file(source)

            # Every run writes a new file on both sides: the untimed step between
            # runs removes what the last one wrote.
            base_put = _best(
                partial(_baseline, source, copy, durable=True),
                reps,
                partial(copy.unlink),
            )
            cas_put = _best(
                partial(cas.put_file, source), reps, partial(cas.remove, digest)
            )
            digest = cas.put_file(source)
            _baseline(source, copy, durable=False)
            base_get = _best(
                partial(_baseline, copy, back, durable=False),
                reps,
                partial(back.unlink),
            )
            cas_get = _best(
                partial(cas.get_to_file, digest, back), reps, partial(back.unlink)
            )

            label = f"{kind} {size} MiB ({cas.meta(digest).encoding})"
            _row(f"{label} put", f"{size / cas_put:8.0f} MiB/s")
            _row(f"{label} put ratio", f"{base_put / cas_put:8.2f}x", "goal >= 0.70x")
            _row(f"{label} get", f"{size / cas_get:8.0f} MiB/s")
            _row(f"{label} get ratio", f"{base_get / cas_get:8.2f}x", "goal >= 0.80x")
            shutil.rmtree(cas.root)
    for name in ("source", "copy", "back"):
        (work / name).unlink(missing_ok=True)


def bench_small(work: Path, count: int, durable_count: int) -> None:
    print(f"4 KiB objects ({count} per mode, fresh random bytes each)")
    cas = LocalCAS(work / "small")
    cas.ensure()

    payloads = [os.urandom(SMALL) for _ in range(durable_count)]
    took = _timed(lambda: [cas.put_bytes(p) for p in payloads])
    _row("durable put, one at a time", f"{durable_count / took:8.0f} /s")

    payloads = [os.urandom(SMALL) for _ in range(count)]

    def batched() -> None:
        for start in range(0, count, 1000):
            for payload in payloads[start : start + 1000]:
                cas.put_bytes(payload, durable=False)
            cas.sync()

    took = _timed(batched)
    _row(
        "put, batches of 1,000 + one sync", f"{count / took:8.0f} /s", "goal >= 20000/s"
    )

    payloads = [os.urandom(SMALL) for _ in range(count)]

    def threaded() -> None:
        for start in range(0, count, 1000):
            cas.put_batch(payloads[start : start + 1000])

    took = _timed(threaded)
    _row("put_batch of 1,000 (4 threads) + one sync", f"{count / took:8.0f} /s")

    digests = [cas.put_bytes(p, durable=False) for p in payloads]
    random.shuffle(digests)
    took = _timed(lambda: [cas.get_bytes(d) for d in digests])
    _row("get (verified), random order", f"{count / took:8.0f} /s", "goal >= 40000/s")
    shutil.rmtree(work / "small")


def _fill(cas: LocalCAS, count: int, size: int = SMALL) -> None:
    """``count`` objects of ``size`` bytes (cheap pseudo-random content)."""
    seed = os.urandom(size)
    batch = []
    for n in range(count):
        batch.append(n.to_bytes(8, "little") + seed[8:])
        if len(batch) == 1000:
            cas.put_batch(batch)
            batch = []
    if batch:
        cas.put_batch(batch)


def _blob_files(cas: LocalCAS) -> list[str]:
    return [str(cas.blob_path(d)) for d in cas.iter_digests()]


def _b3sum(files: list[str]) -> float:
    """Wall time of b3sum over ``files`` (argument lists of 2,000 per call)."""
    started = time.perf_counter()
    for start in range(0, len(files), 2000):
        subprocess.run(
            ["b3sum", *files[start : start + 2000]],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return time.perf_counter() - started


def bench_verify(work: Path, small_count: int, large_count: int) -> None:
    print(f"verify --all against b3sum ({small_count} x 4 KiB, {large_count} x 64 MiB)")
    for label, count, size in (
        ("small objects", small_count, SMALL),
        ("large objects", large_count, 64 * MIB),
    ):
        cas = LocalCAS(work / "verify", compression="none")
        if size == SMALL:
            _fill(cas, count)
        else:
            for _ in range(count):
                cas.put_file(_data_file(work / "big", size, "random"))
                (work / "big").unlink()
        files = _blob_files(cas)
        _b3sum(files)  # warm the page cache for both sides
        hashed = _b3sum(files)
        in_process = _timed(partial(scan.verify, cas))
        command = _timed(
            partial(
                subprocess.run,
                [sys.executable, "-m", "requiem", "cas", "verify", "--all"],
                env={**os.environ, "REQUIEM_CAS_DIR": str(cas.root)},
                check=True,
                capture_output=True,
            )
        )
        _row(f"{label}: b3sum", f"{hashed:8.2f} s")
        _row(f"{label}: verify (in process)", f"{in_process:8.2f} s")
        _row(
            f"{label}: ratio b3sum / verify",
            f"{hashed / in_process:8.2f}x",
            "goal >= 0.80x",
        )
        _row(f"{label}: `requiem cas verify --all` wall", f"{command:8.2f} s")
        shutil.rmtree(cas.root)


# -- memory: each measurement runs in a child that reports its own peak RSS --------


def _child(args: list[str]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process.

    NOTE: ``resource.getrusage`` is not used for the peak: Linux folds the RSS the
    parent had when it forked into the child's ``ru_maxrss`` at exec, so a child
    of a large parent reports the parent's size. ``VmHWM`` is the same counter
    without that, and ``/proc/self/clear_refs`` resets it after start-up.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def child_main(action: str, root: str, path: str) -> None:
    """Run one operation after warming up; print RSS before and peak RSS after."""
    cas = LocalCAS(root)
    cas.ensure()
    cas.put_bytes(b"warm up the code paths")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak, so imports do not hide growth
    before = _status_mib("VmRSS")
    started = time.perf_counter()
    if action == "put":
        cas.put_file(path)
    elif action == "get":
        cas.get_to_file(path, Path(root).parent / "got")
    elif action == "verify":
        scan.verify(cas)
    elif action == "export":
        with open(os.devnull, "w") as sink:
            scan.export_manifest(cas, sink)
    took = time.perf_counter() - started
    peak = _status_mib("VmHWM")
    print(json.dumps({"before": before, "after": peak, "seconds": took}))


def bench_memory(work: Path, big_mib: int, counts: list[int]) -> None:
    print(f"memory (peak RSS growth in a child; goal <= 64 MiB for {big_mib} MiB)")
    root = work / "mem"
    for kind in ("random", "compressible"):
        source = _data_file(work / "big", big_mib * MIB, kind)
        put = _child(["put", str(root), str(source)])
        digest = LocalCAS(root).put_file(source)
        source.unlink()
        got = _child(["get", str(root), digest])
        for name, seen in (("put", put), ("get", got)):
            _row(
                f"{kind} {big_mib} MiB {name}: RSS growth",
                f"{seen['after'] - seen['before']:8.1f} MiB",
                f"({big_mib / seen['seconds']:.0f} MiB/s)",
            )
        shutil.rmtree(root)
        (work / "got").unlink(missing_ok=True)

    print("memory of verify --all / export --all against object count")
    for count in counts:
        cas = LocalCAS(root)
        _fill(cas, count)
        for action in ("verify", "export"):
            seen = _child([action, str(root), ""])
            _row(
                f"{action} {count} objects: RSS growth",
                f"{seen['after'] - seen['before']:8.1f} MiB",
                f"({count / seen['seconds']:.0f} objects/s)",
            )
        shutil.rmtree(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="finish within a minute")
    parser.add_argument("--objects", type=int, help="object count for memory runs")
    parser.add_argument("--only", action="append", help="blobs, small, verify, memory")
    parser.add_argument("--dir", help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return 0

    quick = args.quick
    sections = set(args.only or ["blobs", "small", "verify", "memory"])
    many = args.objects or (1_000 if quick else 100_000)
    load = os.getloadavg()
    print(
        f"bench_cas: {'quick' if quick else 'full'} mode, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-cas-", dir=args.dir) as scratch:
        work = Path(scratch)
        if "blobs" in sections:
            bench_blobs(work, [1, 8] if quick else [1, 16, 64, 256])
        if "small" in sections:
            bench_small(work, 1_000 if quick else 20_000, 50 if quick else 1_000)
        if "verify" in sections:
            bench_verify(work, 500 if quick else 20_000, 1 if quick else 4)
        if "memory" in sections:
            bench_memory(work, 64 if quick else 4096, [many // 10, many])
    return 0


if __name__ == "__main__":
    sys.exit(main())
