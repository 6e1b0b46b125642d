"""Replay: what differs between a stored result and a fresh run of its request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from prometheus_client import Counter

from requiem.engine.models import ExecutionResult

DRIFT_DETECTED = Counter(
    "requiem_drift_detected",
    "Replays whose fresh run differed from the stored result (determinism violations).",
)

# In the order a person wants to hear about them: what the program did first, the
# digests that summarise everything last.
COMPARED = (
    "request_digest",
    "exit_code",
    "termination_reason",
    "error_code",
    "stdout_digest",
    "stderr_digest",
)


class Difference(NamedTuple):
    """One field a replay answered differently (unpacks as a 3-tuple)."""

    field: str
    expected: Any
    actual: Any

    def describe(self) -> str:
        return f"{self.field}: expected {self.expected!r}, got {self.actual!r}"


@dataclass(frozen=True)
class ReplayReport:
    """A replay's verdict: ``ok`` when every reproducible field matched."""

    ok: bool
    differences: list[Difference]
    replayed: ExecutionResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "differences": [d._asdict() for d in self.differences],
            "replayed": self.replayed.model_dump(mode="json"),
        }


def compare(expected: ExecutionResult, actual: ExecutionResult) -> list[Difference]:
    """Every reproducible field that differs, outputs named one path at a time."""
    differences = [
        Difference(name, getattr(expected, name), getattr(actual, name))
        for name in COMPARED
        if getattr(expected, name) != getattr(actual, name)
    ]
    paths = sorted(set(expected.output_digests) | set(actual.output_digests))
    for path in paths:
        before = expected.output_digests.get(path)
        after = actual.output_digests.get(path)
        if before != after:
            differences.append(Difference(f"output:{path}", before, after))
    for name in ("trace_digest", "result_digest"):
        if getattr(expected, name) != getattr(actual, name):
            differences.append(
                Difference(name, getattr(expected, name), getattr(actual, name))
            )
    return differences
