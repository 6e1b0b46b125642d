"""``requiem audit …``: flush, pending, status, verify, search, export, checkpoint.

``flush``, ``pending`` and ``status`` ask the running server first (it holds the
flusher); with no server reachable they act on the database directly and say so on
stderr. The other commands always read the database (and the signing key) here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from requiem import settings
from requiem.cli import output
from requiem.cli.client import ApiClient
from requiem.control import audit_query, audit_service, audit_verify
from requiem.control.audit_keys import (
    AuditKeyUnavailable,
    AuditPublicKeyInvalid,
    AuditSigner,
    parse_public_pem,
)
from requiem.errors import FileMissing, ServerUnreachable, UsageError
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, normalise_url, session_factory

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]

audit_app = typer.Typer(
    name="audit",
    help="The tamper-evident audit log: flush, verify, search, export.",
    no_args_is_help=True,
)


def _sessions() -> sessionmaker[Session]:
    config = settings.load()
    engine = make_engine(config)
    ensure_schema(engine)
    return session_factory(engine)


def _live(method: str, path: str) -> Any | None:
    """The server's answer, or None (with a note) when no server is reachable."""
    client = ApiClient.from_settings(settings.load())
    try:
        return client.request(method, path)
    except ServerUnreachable:
        output.note(
            f"requiem: no server reachable at {client.base_url}; "
            "acting on the database directly"
        )
        return None


def _signer(create: bool) -> AuditSigner:
    return AuditSigner.load(settings.load().audit_key_file, create=create)


@audit_app.command("flush")
def flush(as_json: JsonFlag = False) -> None:
    """Link every pending entry into the chain now; print how many and the head."""
    answer = _live("POST", "/api/admin/audit/flush")
    if answer is None:
        report = audit_service.link(_sessions(), settings.load(), _signer(True))
        answer = {
            "flushed": report.linked,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
            "checkpoint_seq": report.checkpoint_seq,
        }
    if as_json:
        output.print_json(answer)
        return
    output.line(
        f"flushed {answer['flushed']} entries; head {answer['head_seq']} "
        f"{answer['head_hash']}"
    )


@audit_app.command("pending")
def pending(as_json: JsonFlag = False) -> None:
    """How many entries are durable but not yet chained, and the oldest one's age."""
    answer = _live("GET", "/api/admin/audit/pending")
    if answer is None:
        answer = audit_service.pending(_sessions())
    if as_json:
        output.print_json(answer)
        return
    output.line(f"{answer['count']} pending; oldest {answer['oldest_age_s']:.3f} s old")


@audit_app.command("status")
def status(as_json: JsonFlag = False) -> None:
    """Head sequence and hash, lag, last flush, checkpoint and verification."""
    answer = _live("GET", "/api/admin/audit/status")
    if answer is None:
        answer = audit_service.status(_sessions())
    if as_json:
        output.print_json(answer)
        return
    flush_run = answer.get("last_flush") or {}
    checkpoint = answer.get("last_checkpoint") or {}
    verification = answer.get("last_verification") or {}
    verified = "never"
    if verification:
        verified = (
            "ok"
            if verification["ok"]
            else (
                f"FAILED at seq {verification['first_bad_seq']} "
                f"({verification['damage']})"
            )
        )
        verified += f" at {verification['at']}"
    rows = {
        "head seq": answer["head_seq"],
        "head hash": answer["head_hash"],
        "pending": answer["pending"],
        "lag": f"{answer['lag_s']:.3f} s",
        "last flush": flush_run.get("at", "never"),
        "last checkpoint": (
            f"seq {checkpoint['seq']} at {checkpoint['signed_at']}"
            if checkpoint
            else "none"
        ),
        "last verification": verified,
    }
    for name, value in rows.items():
        output.line(f"{name + ':':19s}{value}")


def _trusted_key(public_key: Path | None) -> tuple[Any, str | None]:
    """The key checkpoints must be signed with, and where it came from."""
    if public_key is not None:
        try:
            pem = public_key.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            msg = f"no public key file at {public_key}"
            raise FileMissing(msg, path=str(public_key)) from exc
        except (OSError, UnicodeError) as exc:
            msg = f"cannot read a PEM public key from {public_key}"
            raise AuditPublicKeyInvalid(msg, path=str(public_key)) from exc
        return parse_public_pem(pem), "given"
    try:
        return _signer(False).public_key, "service"
    except AuditKeyUnavailable:
        return None, None


@audit_app.command("verify")
def verify(
    from_seq: Annotated[
        int, typer.Option("--from", min=1, help="Start at this sequence number.")
    ] = 1,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="A checkpoint file saved earlier."),
    ] = None,
    export_file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify an export file instead of the database."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="PEM public key to check signatures with."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Processes for a long chain (default: cores).",
        ),
    ] = min(8, os.cpu_count() or 1),
    as_json: JsonFlag = False,
) -> None:
    """Walk the chain and check every hash, link and checkpoint signature."""
    key, key_source = _trusted_key(public_key)
    if export_file is not None:
        report = _verify_file(export_file, key, key_source)
    else:
        report = _verify_database(from_seq, against, key, key_source, workers)
    if export_file is None and report.checked == 0:
        where = make_url(normalise_url(settings.load().database_url))
        output.note(
            "requiem: note: the audit log in "
            f"{where.render_as_string(hide_password=True)} holds no entries; "
            "if that is not the service's database, set REQUIEM_HOME or DATABASE_URL"
        )
    if as_json:
        output.print_json(report.to_dict())
        return
    signatures = (
        "signatures checked"
        if report.signatures_checked
        else ("signatures NOT checked (no public key)")
    )
    output.line(
        f"audit chain intact: {report.checked} entries up to seq {report.head_seq}, "
        f"{report.checkpoints} checkpoints, {signatures}; head {report.head_hash}"
    )


def _verify_file(path: Path, key: Any, key_source: str | None) -> Any:
    try:
        stream = sys.stdin.buffer if str(path) == "-" else path.open("rb")
    except FileNotFoundError as exc:
        raise FileMissing(f"no export file at {path}", path=str(path)) from exc
    except OSError as exc:
        msg = f"cannot read export file {path}: {exc.strerror}"
        raise UsageError(msg, path=str(path)) from exc
    with stream:
        report = audit_verify.verify_export(stream, key)
    if key_source is not None:
        report.key_source = key_source
    else:
        output.note(
            "requiem: checked with the public key the export carries; pass "
            "--public-key to check it is the service's"
        )
    return report


def _verify_database(
    from_seq: int, against: Path | None, key: Any, key_source: str | None, workers: int
) -> Any:
    sessions = _sessions()
    checkpoint = None
    if against is not None:
        checkpoint, embedded = audit_verify.read_checkpoint_file(against)
        if key is None and embedded is not None:
            key, key_source = parse_public_pem(embedded), "embedded"
            output.note(
                "requiem: no audit key here; checked the checkpoint with the public "
                "key it carries"
            )
    if key is None:
        output.note("requiem: no audit public key: checkpoint signatures not checked")
    report = audit_service.verify(
        sessions, key, from_seq=from_seq, against=checkpoint, workers=workers
    )
    report.key_source = key_source
    return report


@audit_app.command("search")
def search(
    user: Annotated[str | None, typer.Option("--user", help="Actor id.")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Tenant id.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Action.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="'24h ago', '7 days ago', ISO-8601.")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Same forms.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=audit_query.MAX_LIMIT)
    ] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Entries matching every filter given, newest first."""
    query = audit_query.SearchQuery.from_text(
        user=user, tenant=tenant, action=action, since=since, until=until, limit=limit
    )
    entries = audit_query.search(_sessions(), query)
    if as_json:
        output.print_json({"entries": entries, "count": len(entries)})
        return
    output.table(
        None,
        ["seq", "time", "actor", "tenant", "action", "target", "outcome"],
        [
            [
                e["seq"],
                e["ts"],
                e["actor"],
                e["tenant_id"],
                e["action"],
                e["target"],
                e["outcome"],
            ]
            for e in entries
        ],
    )
    output.note(f"{len(entries)} entries")


@audit_app.command("export")
def export(
    since: Annotated[
        str | None, typer.Option("--since", help="'7 days ago', ISO-8601…")
    ] = None,
) -> None:
    """JSON Lines on stdout: entries since a time, then a signed checkpoint."""
    start = audit_query.parse_time(since) if since else None
    sessions = _sessions()
    waiting = audit_service.pending(sessions)["count"]
    if waiting:
        output.note(
            f"requiem: {waiting} pending entries are not in the chain yet and not in "
            "this export; run `requiem audit flush` first to include them"
        )
    lines = 0
    for text in audit_query.export(sessions, _signer(True), start):
        sys.stdout.write(text + "\n")
        lines += 1
    sys.stdout.flush()
    output.note(f"requiem: exported {lines - 1} entries and a checkpoint")


@audit_app.command("checkpoint")
def checkpoint(
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the checkpoint to this file.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The checkpoint at the current head (signed now if needed), with public key."""
    signer = _signer(True)
    signed = audit_query.head_checkpoint(_sessions(), signer)
    document = audit_query.checkpoint_document(signed, signer)
    if out is not None:
        out.write_text(_json_text(document), encoding="utf-8")
        output.note(f"requiem: checkpoint at seq {signed.seq} written to {out}")
    if as_json or out is None:
        output.print_json(document)
        return
    output.line(f"checkpoint seq {signed.seq} head {signed.head_hash}")


def _json_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


@audit_app.command("public-key")
def public_key() -> None:
    """Print the audit public key (PEM) so a third party can verify checkpoints."""
    sys.stdout.write(_signer(True).public_pem())
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add the ``audit`` group to ``app``."""
    app.add_typer(audit_app)
