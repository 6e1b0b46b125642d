"""The drift corpus: requests that each defeat one source of nondeterminism.

Every file in ``corpus/`` names one source (the clock, the timezone, the locale, a seed
drawn from the clock, Python's string hash seed, the environment, the umask, directory
order, the hostname), a request whose output would carry that source if the engine
let it through, and the exact stdout the engine must produce. The expected text was
written by hand from what the engine promises (fixed clock, ``TZ=UTC``, ``C`` locale,
umask 022, a fixed hostname, a fixed environment), and its digest is the plain BLAKE3
of that text, so ``printf '%s' TEXT | b3sum`` reproduces it.

``check`` runs each request once, compares its stdout with the recorded digest, then
replays it ``runs - 1`` more times and collects every field that differs. Any
difference is drift.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from requiem import digest
from requiem.engine.errors import DriftDetected
from requiem.errors import ConfigError

CORPUS_PACKAGE = "requiem.engine"
CORPUS_DIR = "corpus"
# The clock every corpus expectation was written for (1980-01-01T00:00:00Z); drift is
# checked under it whatever REQUIEM_SOURCE_DATE_EPOCH the operator chose.
CORPUS_EPOCH = 315532800
SHOWN_OUTPUT_CHARS = 200


@dataclass(frozen=True)
class CorpusEntry:
    name: str
    defeats: str
    request: dict[str, Any]
    expected_stdout: str
    expected_stdout_digest: str


@dataclass(frozen=True)
class Difference:
    run: int
    field: str
    expected: Any
    actual: Any

    def describe(self) -> str:
        said = f"expected {self.expected!r}, got {self.actual!r}"
        return f"run {self.run}: {self.field} {said}"


@dataclass
class Outcome:
    name: str
    defeats: str
    runs: int
    differences: list[Difference] = field(default_factory=list)
    not_enforced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "defeats": self.defeats,
            "ok": self.ok,
            "runs": self.runs,
            "differences": [vars(d) for d in self.differences],
            "not_enforced": self.not_enforced,
        }


def _entry(name: str, raw: Any) -> CorpusEntry:
    """One corpus file, checked: its recorded digest must be the BLAKE3 of its text."""
    keys = ("defeats", "request", "expected_stdout", "expected_stdout_digest")
    if not isinstance(raw, dict) or any(k not in raw for k in keys):
        msg = f"drift corpus file {name!r} lacks one of {', '.join(keys)}"
        raise ConfigError(msg, corpus_file=name)
    text = raw["expected_stdout"]
    if digest.of_bytes(text.encode()) != raw["expected_stdout_digest"]:
        msg = f"drift corpus file {name!r}: expected_stdout_digest is not its text's"
        raise ConfigError(msg, corpus_file=name)
    return CorpusEntry(
        name=name,
        defeats=raw["defeats"],
        request=raw["request"],
        expected_stdout=text,
        expected_stdout_digest=raw["expected_stdout_digest"],
    )


def load_corpus(names: list[str] | None = None) -> list[CorpusEntry]:
    """The shipped corpus in name order, or only ``names`` (unknown names refused)."""
    folder = resources.files(CORPUS_PACKAGE).joinpath(CORPUS_DIR)
    entries = {}
    for item in folder.iterdir():
        if item.name.endswith(".json"):
            name = item.name.removesuffix(".json")
            entries[name] = _entry(name, digest.parse_json(item.read_bytes()))
    if names:
        unknown = sorted(set(names) - set(entries))
        if unknown:
            msg = f"no drift corpus request named {', '.join(unknown)}"
            raise ConfigError(msg, known=sorted(entries))
        return [entries[n] for n in sorted(set(names))]
    return [entries[n] for n in sorted(entries)]


def _shown(data: Any) -> str:
    if isinstance(data, bytes | bytearray):
        data = bytes(data).decode(errors="replace")
    text = str(data)
    if len(text) > SHOWN_OUTPUT_CHARS:
        return text[:SHOWN_OUTPUT_CHARS] + "…"
    return text


def check_entry(engine: Any, entry: CorpusEntry, runs: int, workspace: Path) -> Outcome:
    """Run ``entry`` once against its recorded digest, then replay it runs - 1 times."""
    from requiem.engine import ExecutionRequest

    outcome = Outcome(entry.name, entry.defeats, runs)
    raw = {**entry.request, "workspace_root": str(workspace)}
    request = ExecutionRequest.parse(raw)

    first = engine.run(request, use_cache=False)
    outcome.not_enforced = sorted(_not_enforced(first))
    if first.exit_code != 0:
        outcome.differences.append(Difference(1, "exit_code", 0, first.exit_code))
    if first.stdout_digest != entry.expected_stdout_digest:
        outcome.differences.append(
            Difference(1, "stdout", entry.expected_stdout, _shown(first.stdout))
        )

    for run in range(2, runs + 1):
        replay = engine.replay(first)
        for found in replay.differences:
            outcome.differences.append(
                Difference(run, found.field, found.expected, found.actual)
            )
    return outcome


def _not_enforced(result: Any) -> list[str]:
    """Controls the sandbox reported it could not apply on this machine."""
    applied = getattr(result, "sandbox_applied", None) or {}
    missing = applied.get("not_enforced") if isinstance(applied, dict) else None
    return list(missing or [])


def check(engine: Any, runs: int = 3, names: list[str] | None = None) -> list[Outcome]:
    """Every corpus request checked ``runs`` times, each in a fresh workspace."""
    if runs < 1:
        msg = f"--runs must be at least 1 (got {runs})"
        raise ConfigError(msg)
    outcomes = []
    for entry in load_corpus(names):
        with tempfile.TemporaryDirectory(prefix=f"requiem-drift-{entry.name}-") as tmp:
            outcomes.append(check_entry(engine, entry, runs, Path(tmp)))
    return outcomes


def raise_if_drifted(outcomes: list[Outcome]) -> None:
    drifted = [o for o in outcomes if not o.ok]
    if not drifted:
        return
    first = drifted[0]
    names = ", ".join(f"{o.name} ({o.differences[0].field})" for o in drifted)
    msg = f"drift in {names}; first: {first.name} {first.differences[0].describe()}"
    if first.not_enforced:
        msg += f" (not enforced here: {', '.join(first.not_enforced)})"
    raise DriftDetected(msg, outcomes=[o.to_dict() for o in outcomes])
