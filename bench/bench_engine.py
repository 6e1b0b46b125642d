"""What the engine adds to a process spawn, what a cache hit costs, and its memory.

Prints measured numbers next to the goals; it never fails on a missed goal (only on a
crash). Everything runs in this process against a throwaway REQUIEM_HOME:

* latency: median wall time of ``Engine.run`` of ``/bin/true`` (no cache) minus the
  median of a bare ``subprocess.run(["/bin/true"])`` — goal ≤ 2 ms without the
  sandbox, ≤ 8 ms with bubblewrap;
* cache hit: median of ``Engine.run`` of a request already in the cache — goal ≤ 1 ms;
* memory: a fresh Python process runs a command writing 1 GiB to stdout through the
  engine; its peak RSS after the run minus its peak RSS before — goal ≤ 64 MiB.

Usage: ``python bench/bench_engine.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from requiem import log, settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest
from requiem.engine import sandbox as sandbox_mod

GOALS_MS = {"no sandbox": 2.0, "bubblewrap": 8.0, "cache hit": 1.0}
GOAL_MEMORY_MIB = 64
MIB = 1 << 20

MEMORY_PROBE = """
import json, resource, sys
from requiem import log, settings
from requiem.cas.store import LocalCAS
from requiem.engine import Engine, ExecutionRequest

size = int(sys.argv[1])
log.configure("warning")
config = settings.load()
engine = Engine(LocalCAS.from_settings(config), config)
warm = ExecutionRequest.from_mapping({"command": "/bin/true"})
engine.run(warm, use_cache=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
request = ExecutionRequest.from_mapping({
    "command": "head", "argv": ["-c", str(size), "/dev/zero"],
    "policy": {"sandbox": False}, "timeout_ms": 600000,
})
result = engine.run(request, use_cache=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after,
                  "stdout_size": result.stdout_size, "ok": result.ok}))
"""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _timed(action: Any, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def measure_latency(engine: Engine, rounds: int, sandboxed: bool) -> dict[str, float]:
    request = ExecutionRequest.from_mapping(
        {"command": "/bin/true", "policy": {"sandbox": sandboxed}}
    )
    engine.run(request, use_cache=False)  # warm: imports, probe, first CAS writes
    bare = _timed(lambda: subprocess.run(["/bin/true"], check=True), rounds)
    through = _timed(lambda: engine.run(request, use_cache=False), rounds)
    return {
        "bare_ms": _median_ms(bare),
        "engine_ms": _median_ms(through),
        "added_ms": _median_ms(through) - _median_ms(bare),
    }


def measure_tool_floor(caps: Any, rounds: int) -> dict[str, float]:
    """What the wrappers cost alone: bwrap (the engine's own argv) and prlimit."""
    floor = {}
    if caps.bwrap_works:
        argv = sandbox_mod.bwrap_argv(
            caps.bwrap_path,
            workspace=None,
            etc_dir=None,
            network=False,
            ro_paths=[],
            faketime=None,
            cwd=sandbox_mod.SANDBOX_WORKSPACE,
        )
        runs = _timed(lambda: subprocess.run([*argv, "/bin/true"], check=True), rounds)
        floor["bwrap_true_ms"] = _median_ms(runs)
    if caps.rlimits:
        argv = sandbox_mod.prlimit_argv(
            caps.prlimit_path, max_memory_bytes=None, max_fds=1024, max_cpu_seconds=None
        )
        runs = _timed(lambda: subprocess.run([*argv, "/bin/true"], check=True), rounds)
        floor["prlimit_true_ms"] = _median_ms(runs)
    return floor


def profile_run(engine: Engine, rounds: int, sandboxed: bool) -> None:
    """Where ``Engine.run`` spends its time: cProfile, top entries by cumulative."""
    import cProfile
    import pstats

    request = ExecutionRequest.from_mapping(
        {"command": "/bin/true", "policy": {"sandbox": sandboxed}}
    )
    engine.run(request, use_cache=False)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        engine.run(request, use_cache=False)
    profiler.disable()
    print(f"profile of {rounds} runs, sandbox={sandboxed}:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(30)


def measure_cache_hit(engine: Engine, rounds: int) -> float:
    request = ExecutionRequest.from_mapping(
        {"command": "/bin/true", "argv": ["cache"], "policy": {"sandbox": False}}
    )
    engine.run(request, use_cache=True)
    first = engine.run(request, use_cache=True)
    if not first.cache_hit:
        msg = "a repeated request was not answered from the cache"
        raise SystemExit(msg)
    return _median_ms(_timed(lambda: engine.run(request, use_cache=True), rounds))


def measure_memory(home: Path, size: int) -> dict[str, Any]:
    env = {**os.environ, "REQUIEM_HOME": str(home), "REQUIEM_LOG_LEVEL": "warning"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(size)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    found = json.loads(proc.stdout)
    found["growth_mib"] = (found["after_kib"] - found["before_kib"]) / 1024
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 256 MiB")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="print where Engine.run spends time"
    )
    args = parser.parse_args()
    log.configure("warning")
    rounds = 30 if args.quick else 200
    size = (256 if args.quick else 1024) * MIB

    with tempfile.TemporaryDirectory(prefix="requiem-bench-") as tmp:
        home = Path(tmp)
        config = settings.load({"REQUIEM_HOME": str(home)})
        engine = Engine(LocalCAS.from_settings(config), config)
        caps = sandbox_mod.probe(config)

        if args.profile:
            profile_run(engine, rounds, sandboxed=False)
            if caps.bwrap_works:
                profile_run(engine, rounds, sandboxed=True)
            return 0

        found: dict[str, Any] = {"rounds": rounds}
        found["tool floor"] = measure_tool_floor(caps, rounds)
        found["no sandbox"] = measure_latency(engine, rounds, sandboxed=False)
        if caps.bwrap_works:
            found["bubblewrap"] = measure_latency(engine, rounds, sandboxed=True)
        found["cache hit"] = {"engine_ms": measure_cache_hit(engine, rounds)}
        found["memory"] = measure_memory(home, size)

    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(
        f"engine benchmark, median of {rounds} rounds (python {sys.version.split()[0]})"
    )
    for name in ("no sandbox", "bubblewrap"):
        if name not in found:
            print(f"  {name:<11} not measured: bubblewrap does not work here")
            continue
        row = found[name]
        print(
            f"  {name:<11} bare /bin/true {row['bare_ms']:6.2f} ms, through engine"
            f" {row['engine_ms']:6.2f} ms, added {row['added_ms']:6.2f} ms"
            f" (goal <= {GOALS_MS[name]} ms)"
        )
    for tool, ms in found["tool floor"].items():
        print(f"  floor       {tool.removesuffix('_ms')}: {ms:6.2f} ms")
    hit = found["cache hit"]["engine_ms"]
    print(f"  cache hit   {hit:6.2f} ms (goal <= {GOALS_MS['cache hit']} ms)")
    memory = found["memory"]
    print(
        f"  memory      {memory['stdout_size'] / MIB:.0f} MiB of stdout captured:"
        f" peak RSS grew {memory['growth_mib']:.1f} MiB (goal <= {GOAL_MEMORY_MIB} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
