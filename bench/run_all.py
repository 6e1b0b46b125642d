"""Run every ``bench/bench_*.py`` in quick mode and say which ones failed.

Benchmarks print measured numbers; none of them asserts a time. A benchmark that
crashes makes this script exit 1 so ``make bench`` notices.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name} --quick", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--quick"], check=False)
        took = time.perf_counter() - started
        print(f"== {script.name}: exit {proc.returncode} in {took:.1f} s", flush=True)
        if proc.returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(scripts)} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
