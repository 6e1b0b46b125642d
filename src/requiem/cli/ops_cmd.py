"""Operator checks: ``doctor``, ``health``, ``version`` and ``verify drift|full``.

Each check is a :class:`Check` with a status: ``ok``, ``warning`` (works, but a
guarantee is weaker: say what to install) or ``failed`` (a blocker: the product
cannot keep its promises here). A command prints its checks as a table or, with
``--json``, as one document; when something it checks does not hold it raises its
own error (carrying the checks in ``details``), so the exit code and the one-line
reason come from the error tree:

    doctor_blocked       exit 2   a blocking check failed
    unhealthy            exit 6   the engine or a dependency is not usable
    drift_detected       exit 5   (the engine's error, raised by the drift corpus)
    verification_failed  exit 5   one part of ``verify full`` failed
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from requiem import digest, settings
from requiem.cli import output
from requiem.errors import InvalidInput, RequiemError, Unavailable, Unprocessable


class DoctorBlocked(InvalidInput):
    code = "doctor_blocked"


class Unhealthy(Unavailable):
    code = "unhealthy"


class VerificationFailed(Unprocessable):
    code = "verification_failed"


OK, WARNING, BLOCKER = "ok", "warning", "failed"
MIN_PYTHON = (3, 11)
LIBRARIES = (
    "blake3",
    "rfc8785",
    "zstandard",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "fastapi",
    "uvicorn",
    "pydantic",
    "httpx",
    "typer",
    "structlog",
    "prometheus-client",
    "pyjwt",
    "cryptography",
)

# Official BLAKE3 test vectors (input bytes are ``i % 251``): lengths around the
# 1 KiB chunk boundary and past the point where the tree has several levels.
BLAKE3_VECTORS = {
    0: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    1: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1024: "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
    1025: "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444",
    8193: "bab6c09cb8ce8cf459261398d2e7aef35700bf488116ceb94a36d0f5f1b7bc3b",
    102400: "bc3e3d41a1146b069abffad3c0d44860cf664390afce4d9661f7902e7943e085",
}
# RFC 8785: keys sorted by UTF-16 code units, numbers in their shortest form.
CANONICAL_JSON_CASE = {"b": [1.0, 1e21], "a": "\u00e9", "\u20ac": None}
CANONICAL_JSON_BYTES = '{"a":"é","b":[1,1e+21],"€":null}'.encode()
VERSION_NUMBER = re.compile(r"\d+(?:\.\d+)+")
CAS_PROBE = b"requiem doctor: CAS read/write probe\n"

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != BLOCKER


# -- individual checks -------------------------------------------------------------


def check_hash() -> Check:
    """BLAKE3 against embedded official vectors, and RFC 8785 canonical JSON."""
    wrong = [
        length
        for length, expected in BLAKE3_VECTORS.items()
        if digest.of_bytes(bytes(i % 251 for i in range(length))) != expected
    ]
    backend = f"blake3 {metadata.version('blake3')} (Rust)"
    if wrong:
        return Check("hash", BLOCKER, f"{backend}: wrong digest for lengths {wrong}")
    if digest.canonical_json(CANONICAL_JSON_CASE) != CANONICAL_JSON_BYTES:
        return Check("hash", BLOCKER, "canonical JSON differs from RFC 8785")
    count = len(BLAKE3_VECTORS)
    return Check("hash", OK, f"{backend}: {count} vectors and RFC 8785 agree")


def check_cas(config: settings.Settings) -> Check:
    """Write a small object, read it back through the integrity check."""
    from requiem.cas.store import LocalCAS

    root = config.cas_dir
    try:
        cas = LocalCAS.from_settings(config)
        cas.ensure()
        key = cas.put_bytes(CAS_PROBE)
        if cas.get_bytes(key) != CAS_PROBE:
            return Check("cas", BLOCKER, f"{root}: probe object read back differently")
    except RequiemError as exc:
        return Check("cas", BLOCKER, f"{root}: {exc.message}")
    except OSError as exc:
        return Check("cas", BLOCKER, f"{root}: {exc.strerror or exc}")
    return Check("cas", OK, f"{root}: writable and readable")


def check_python() -> Check:
    version = platform.python_version()
    shown = f"{platform.python_implementation()} {version} ({sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        needed = ".".join(map(str, MIN_PYTHON))
        return Check("python", BLOCKER, f"{shown}: {needed} or newer is required")
    return Check("python", OK, shown)


def sandbox_checks(config: settings.Settings) -> list[Check]:
    """bwrap, libfaketime, prlimit: found and working, else a warning with a fix."""
    from requiem.engine import sandbox

    caps = sandbox.probe(config)
    tools = (
        (
            "bubblewrap",
            caps.bwrap_works,
            caps.bwrap_path,
            "runs are not isolated (no namespaces)",
            "'bubblewrap' (or set REQUIEM_BWRAP)",
        ),
        (
            "libfaketime",
            caps.faketime_works,
            caps.faketime_path,
            "children see the real clock",
            "'libfaketime' (or set REQUIEM_FAKETIME_LIB)",
        ),
        (
            "rlimits",
            caps.rlimits,
            caps.prlimit_path,
            "memory, fd and CPU limits are not enforced",
            "'util-linux' (it ships prlimit)",
        ),
    )
    checks = []
    for name, works, path, consequence, package in tools:
        if works:
            checks.append(Check(name, OK, f"{path}: works"))
        else:
            where = f"{path} does not work here" if path else "not found"
            detail = f"{where}; {consequence}: install the Debian package {package}"
            checks.append(Check(name, WARNING, detail))
    return checks


def ping_database(config: settings.Settings) -> str:
    """``SELECT 1`` on the configured database; returns its backend and host."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from requiem.store import db

    engine = db.make_engine(config)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    url = make_url(db.normalise_url(config.database_url))
    where = url.database if url.get_backend_name() == "sqlite" else url.host
    return f"{url.get_backend_name()} at {where}"


def missing_sqlite_folder(config: settings.Settings) -> Path | None:
    """The folder of a configured SQLite file when it does not exist, else None."""
    from requiem.store import db

    url = db.parse_url(config.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    folder = Path(url.database).absolute().parent
    return None if folder.is_dir() else folder


def check_database(config: settings.Settings, *, required: bool) -> Check:
    """Reach the database; skipped (ok) when none is configured and not ``required``."""
    if not required and not config.is_set("DATABASE_URL"):
        return Check("database", OK, "DATABASE_URL not set (embedded SQLite default)")
    try:
        folder = missing_sqlite_folder(config)
        if folder is not None:
            # A check creates nothing: connecting would make the folder and file.
            detail = f"sqlite folder {folder} does not exist yet (made on first use)"
            return Check("database", WARNING, detail)
        where = ping_database(config)
    except RequiemError as exc:
        return Check("database", BLOCKER, exc.message)
    except Exception as exc:  # noqa: BLE001 - any driver error means "unreachable"
        # The driver's message can quote the URL; only its kind is shown.
        return Check("database", BLOCKER, f"unreachable ({type(exc).__name__})")
    return Check("database", OK, f"{where}: reachable")


def check_spawn(config: settings.Settings) -> Check:
    """The engine runs ``true`` (uncached) and its result says exit 0."""
    from requiem.cas.store import LocalCAS
    from requiem.engine import Engine, ExecutionRequest

    request = ExecutionRequest.from_mapping({"command": "true", "timeout_ms": 10_000})
    try:
        result = Engine(LocalCAS.from_settings(config), config).run(
            request, use_cache=False
        )
    except RequiemError as exc:
        return Check("spawn", BLOCKER, f"the engine cannot run true: {exc.message}")
    except OSError as exc:
        return Check("spawn", BLOCKER, f"the engine cannot run true: {exc}")
    if not result.ok:
        why = result.error_message or f"exit {result.exit_code}"
        return Check("spawn", BLOCKER, f"the engine ran true: {why}")
    where = "in bubblewrap" if result.sandbox_applied.get("bubblewrap") else "bare"
    return Check("spawn", OK, f"the engine ran true {where} in {result.duration_ms} ms")


def check_server(config: settings.Settings) -> Check:
    from requiem.cli.client import ApiClient

    client = ApiClient.from_settings(config, timeout=5.0)
    try:
        body = client.get("/api/health")
    except RequiemError as exc:
        return Check("server", BLOCKER, f"{client.base_url}: {exc.message}")
    status = body.get("status", "ok") if isinstance(body, dict) else "ok"
    return Check("server", OK, f"{client.base_url}: {status}")


# -- reporting ---------------------------------------------------------------------


def report(checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": all(c.ok for c in checks),
        "checks": [asdict(c) for c in checks],
        "blockers": [c.name for c in checks if c.status == BLOCKER],
        "warnings": [c.name for c in checks if c.status == WARNING],
    }


def show(title: str, checks: list[Check], as_json: bool) -> None:
    """Print the checks unless they failed under --json (the error carries them)."""
    summary = report(checks)
    if as_json:
        if summary["ok"]:
            output.print_json(summary)
        return
    rows = [[c.name, c.status, c.detail] for c in checks]
    output.table(title, ["check", "status", "detail"], rows)


def fail_if_blocked(checks: list[Check], error: type[RequiemError], what: str) -> None:
    summary = report(checks)
    if summary["ok"]:
        return
    failed = "; ".join(f"{c.name}: {c.detail}" for c in checks if c.status == BLOCKER)
    raise error(f"{what}: {failed}", **summary)


def tool_version(argv: list[str]) -> str | None:
    """The version number a tool prints for its version flag, or None."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    found = VERSION_NUMBER.search(text)
    return found.group(0) if found else None


def version_report(config: settings.Settings) -> dict[str, Any]:
    from requiem.engine import sandbox

    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    caps = sandbox.probe(config)
    bwrap = tool_version([caps.bwrap_path, "--version"]) if caps.bwrap_path else None
    faketime_cli = shutil.which("faketime")
    faketime = tool_version([faketime_cli, "--version"]) if faketime_cli else None
    return {
        "requiem": metadata.version("requiem"),
        "python": {
            "implementation": platform.python_implementation(),
            "version": platform.python_version(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "libraries": libraries,
        "sandbox": {
            "bubblewrap": {"path": caps.bwrap_path, "version": bwrap},
            "libfaketime": {"path": caps.faketime_path, "version": faketime},
        },
    }


# -- commands ----------------------------------------------------------------------


def doctor_checks(config: settings.Settings) -> list[Check]:
    return [
        check_hash(),
        check_cas(config),
        *sandbox_checks(config),
        check_python(),
        check_database(config, required=False),
    ]


def doctor(as_json: JsonFlag = False) -> None:
    """Check this machine can keep Requiem's promises (exit 2 if it cannot)."""
    config = settings.load()
    checks = doctor_checks(config)
    show("requiem doctor", checks, as_json)
    fail_if_blocked(checks, DoctorBlocked, "doctor found blockers")


def health_checks(config: settings.Settings) -> list[Check]:
    return [check_spawn(config), check_cas(config)]


def dependency_checks(config: settings.Settings) -> list[Check]:
    checks = [check_database(config, required=True), check_cas(config)]
    checks.extend(sandbox_checks(config))
    if config.is_set("REQUIEM_URL"):
        checks.append(check_server(config))
    return checks


def version(as_json: JsonFlag = False) -> None:
    """Product, Python, key library and sandbox tool versions."""
    found = version_report(settings.load())
    if as_json:
        output.print_json(found)
        return
    python = found["python"]
    pairs: dict[str, Any] = {
        "requiem": found["requiem"],
        "python": f"{python['implementation']} {python['version']}",
        "platform": found["platform"],
    }
    pairs.update(found["libraries"])
    for tool, seen in found["sandbox"].items():
        pairs[tool] = (
            f"{seen['version'] or 'version unknown'} at {seen['path']}"
            if seen["path"]
            else "not found"
        )
    output.key_values({k: v or "not installed" for k, v in pairs.items()})


def drift_engine(config: settings.Settings) -> Any:
    """An engine on the configured CAS, its clock pinned to the corpus's epoch."""
    from requiem.cas.store import LocalCAS
    from requiem.engine import Engine
    from requiem.engine.drift import CORPUS_EPOCH

    pinned = settings.load(
        {**config.raw, "REQUIEM_SOURCE_DATE_EPOCH": str(CORPUS_EPOCH)}
    )
    return Engine(LocalCAS.from_settings(pinned), pinned)


def verify_drift(
    runs: Annotated[int, typer.Option(help="Runs of each request.")] = 3,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Check only this request.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the drift corpus N times against its recorded digests (exit 5 on drift)."""
    from requiem.engine import drift

    outcomes = drift.check(drift_engine(settings.load()), runs=runs, names=only)
    if as_json:
        if all(o.ok for o in outcomes):
            output.print_json(
                {"ok": True, "runs": runs, "outcomes": [o.to_dict() for o in outcomes]}
            )
    else:
        rows = [
            [
                o.name,
                "ok" if o.ok else "DRIFT",
                o.defeats if o.ok else o.differences[0].describe(),
                ", ".join(o.not_enforced),
            ]
            for o in outcomes
        ]
        each = "1 run" if runs == 1 else f"{runs} runs"
        title = f"requiem verify drift ({each} of each request)"
        output.table(title, ["request", "status", "detail", "not enforced"], rows)
    drift.raise_if_drifted(outcomes)


def cas_sample_check(size: int) -> Check:
    """``requiem cas verify --sample N`` run as the operator would run it."""
    argv = [sys.executable, "-m", "requiem", "cas", "verify", "--sample", str(size)]
    proc = subprocess.run(
        [*argv, "--json"], capture_output=True, text=True, check=False
    )
    said = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        last = said[-1] if said else ""
        return Check("cas verify", BLOCKER, f"exit {proc.returncode}: {last}")
    checked = json.loads(proc.stdout).get("checked", size)
    return Check("cas verify", OK, f"{checked} sampled objects verified")


def verify_full(as_json: JsonFlag = False) -> None:
    """doctor, cas verify --sample 100, one drift run and a database ping, summed up."""
    from requiem.engine import drift

    config = settings.load()
    checks = doctor_checks(config)
    checks.append(cas_sample_check(100))
    try:
        outcomes = drift.check(drift_engine(config), runs=1)
    except RequiemError as exc:
        checks.append(Check("drift", BLOCKER, exc.message))
    else:
        drifted = [o for o in outcomes if not o.ok]
        detail = (
            f"{len(outcomes)} corpus requests reproduce their recorded digests"
            if not drifted
            else "; ".join(f"{o.name}: {o.differences[0].describe()}" for o in drifted)
        )
        checks.append(Check("drift", BLOCKER if drifted else OK, detail))
    show("requiem verify full", checks, as_json)
    fail_if_blocked(checks, VerificationFailed, "verification failed")


# Other command modules may add their own checks here (``verify mcp``).
verify_app = typer.Typer(help="Verify determinism and the whole installation.")
verify_app.command("drift")(verify_drift)
verify_app.command("full")(verify_full)


def register(app: typer.Typer) -> None:
    """Add ``doctor``, ``health``, ``version`` and ``verify`` to ``app``."""
    app.command("doctor")(doctor)
    app.command("version")(version)

    health_app = typer.Typer(
        help="Liveness of the engine and of what it depends on.",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @health_app.callback()
    def health(ctx: typer.Context, as_json: JsonFlag = False) -> None:
        """The engine can spawn and use the CAS (exit 6 if not)."""
        if ctx.invoked_subcommand is not None:
            return
        checks = health_checks(settings.load())
        show("requiem health", checks, as_json)
        fail_if_blocked(checks, Unhealthy, "unhealthy")

    @health_app.command("dependencies")
    def dependencies(as_json: JsonFlag = False) -> None:
        """Database, CAS, sandbox tools and the server at REQUIEM_URL if set."""
        checks = dependency_checks(settings.load())
        show("requiem health dependencies", checks, as_json)
        fail_if_blocked(checks, Unhealthy, "a dependency is unhealthy")

    app.add_typer(health_app, name="health")

    app.add_typer(verify_app, name="verify")
