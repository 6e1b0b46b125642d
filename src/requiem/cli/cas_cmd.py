"""``requiem cas``: put, get, stats, verify, export and gc on the local CAS."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from requiem import log, settings
from requiem.cas import gc, scan
from requiem.cas.store import CasIntegrityFailed, LocalCAS
from requiem.cli import output
from requiem.errors import FileMissing, UsageError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

cas_app = typer.Typer(
    name="cas",
    help="The content-addressed store: put, get, stats, verify, export, gc.",
    no_args_is_help=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def register(app: typer.Typer) -> None:
    app.add_typer(cas_app)


def _store() -> LocalCAS:
    return LocalCAS.from_settings(settings.load())


@cas_app.command("put")
def put(
    source: Annotated[str, typer.Argument(help="A file, or - for standard input.")],
    as_json: JsonFlag = False,
) -> None:
    """Store FILE (or stdin) and print its digest."""
    cas = _store()
    if source == "-":
        digest = cas.put_stream(sys.stdin.buffer)
    else:
        path = Path(source)
        if not path.exists():
            msg = f"no such file: {source}"
            raise FileMissing(msg, path=source)
        if path.is_dir():
            msg = f"{source} is a directory; cas put stores one file"
            raise UsageError(msg, path=source)
        digest = cas.put_file(path)
    if as_json:
        meta = cas.meta(digest)
        output.print_json({"digest": digest, **meta.__dict__})
    else:
        output.line(digest)


@cas_app.command("get")
def get(
    digest: Annotated[str, typer.Argument(help="The object's digest.")],
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here, not stdout.")
    ] = None,
) -> None:
    """Write an object to stdout or -o FILE; nothing that did not verify."""
    cas = _store()
    if out is None:
        cas.get_to_stream(digest, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    if out.is_dir():
        msg = f"{out} is a directory; give a file name"
        raise UsageError(msg, path=str(out))
    if not out.parent.is_dir():
        msg = f"no such directory: {out.parent}"
        raise FileMissing(msg, path=str(out.parent))
    cas.get_to_file(digest, out)


@cas_app.command("stats")
def stats(as_json: JsonFlag = False) -> None:
    """Objects, logical and stored bytes, compression ratio, by encoding."""
    report = scan.stats(_store())
    if as_json:
        output.print_json(report)
        return
    output.key_values(
        {
            "root": report["root"],
            "objects": report["objects"],
            "logical bytes": report["logical_bytes"],
            "stored bytes": report["stored_bytes"],
            "compression ratio": report["compression_ratio"],
            "incomplete or unreadable": report["incomplete_or_unreadable"],
            "temp files": report["temp_files"],
        }
    )
    rows = [
        [name, t["objects"], t["logical_bytes"], t["stored_bytes"]]
        for name, t in report["by_encoding"].items()
    ]
    if rows:
        output.table(None, ["encoding", "objects", "logical", "stored"], rows)


@cas_app.command("verify")
def verify(
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=1, help="Check N objects picked at random."),
    ] = None,
    check_all: Annotated[
        bool, typer.Option("--all", help="Check every object.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Re-hash objects; exit 4 (cas_integrity_failed) if any is bad."""
    if (sample is None) == (not check_all):
        msg = "give exactly one of --sample N or --all"
        raise UsageError(msg)
    cas = _store()

    if sys.stderr.isatty():
        report = _verify_with_progress(cas, sample)
    else:
        report = scan.verify(cas, sample=sample)
    if not report.ok:
        log.get("requiem.cas").warning(
            "cas.verify_failed", mode=report.mode, bad=len(report.bad)
        )

    if as_json:
        output.print_json(report.as_dict())
    else:
        for bad in report.bad:
            output.line(f"{bad['reason']}  {bad.get('digest') or bad.get('path')}")
        output.note(
            f"{report.checked} of {report.objects} objects checked, "
            f"{report.good} good, {_problems(len(report.bad))}"
        )
    if not report.ok:
        failure = CasIntegrityFailed(
            f"{_problems(len(report.bad))} in the CAS at {cas.root}"
        )
        sys.stderr.write(f"requiem: error[{failure.code}]: {failure.message}\n")
        raise typer.Exit(failure.exit_code)


def _problems(count: int) -> str:
    return f"{count} problem" if count == 1 else f"{count} problems"


def _verify_with_progress(cas: LocalCAS, sample: int | None) -> scan.VerifyReport:
    from rich.progress import Progress

    total = scan.count_objects(cas) if sample is None else None
    with Progress(console=output.err, transient=True) as progress:
        task = progress.add_task("verifying", total=total or sample)
        return scan.verify(cas, sample=sample, advance=lambda: progress.advance(task))


@cas_app.command("export")
def export(
    export_all: Annotated[
        bool, typer.Option("--all", help="Every object (the only mode).")
    ] = False,
) -> None:
    """A JSON manifest of every object on stdout, written object by object."""
    if not export_all:
        msg = "cas export needs --all"
        raise UsageError(msg)
    count = scan.export_manifest(_store(), sys.stdout)
    sys.stdout.flush()
    output.note(f"{count} objects exported")


@cas_app.command("gc")
def collect(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would go; remove nothing.")
    ] = False,
    grace: Annotated[
        str,
        typer.Option(
            "--grace", help="Keep anything used more recently than this (90s, 1h)."
        ),
    ] = "1h",
    as_json: JsonFlag = False,
) -> None:
    """Remove objects no stored result or pin references, and stale temp files."""
    grace_s = gc.parse_duration(grace)
    config = settings.load()
    cas = LocalCAS.from_settings(config)

    if dry_run:
        report = gc.collect(cas, grace_s=grace_s, dry_run=True)
    else:
        with _audit_log(config) as factory:  # reachable before anything is removed
            report = gc.collect(cas, grace_s=grace_s)
            _audit_collection(factory, cas, report)
    log.get("requiem.cas").info(
        "cas.gc",
        dry_run=dry_run,
        removed=report.removed,
        removed_bytes=report.removed_bytes,
        temp_removed=report.temp_removed,
    )

    if as_json:
        output.print_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for problem in report.problems:
        output.note(
            f"warning: {problem['problem']}: "
            f"{problem.get('digest') or problem.get('path')}"
        )
    output.key_values(
        {
            "objects examined": report.examined,
            "referenced": report.referenced,
            "younger than grace": report.young,
            f"{verb} objects": report.removed,
            f"{verb} bytes": report.removed_bytes,
            f"{verb} temp files": report.temp_removed,
        }
    )


@contextmanager
def _audit_log(config: settings.Settings) -> Iterator[sessionmaker[Session]]:
    from requiem.store.bootstrap import ensure_schema
    from requiem.store.db import make_engine, session_factory

    engine = make_engine(config)
    try:
        ensure_schema(engine)
        yield session_factory(engine)
    finally:
        engine.dispose()


def _audit_collection(
    factory: sessionmaker[Session], cas: LocalCAS, report: gc.GcReport
) -> None:
    """One audit entry for a collection that removed something."""
    if not report.removed and not report.temp_removed:
        return
    from requiem.control import audit

    audit.record(
        factory,
        "cas.gc",
        actor="cli",
        target=str(cas.root),
        source="cli",
        details={
            "removed": report.removed,
            "removed_bytes": report.removed_bytes,
            "temp_removed": report.temp_removed,
            "grace_s": report.grace_s,
        },
    )
