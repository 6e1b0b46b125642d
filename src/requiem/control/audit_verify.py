"""Proving the audit chain intact, in the database or in an export file.

The walk recomputes every entry's hash, checks that each entry names its
predecessor's hash and that sequence numbers have no gap, and checks every signed
checkpoint on the way: its signature, and that the chain's hash at its sequence
number is the one it signed. A checkpoint kept outside the database (``audit
checkpoint --out``) catches even a rewrite that recomputed every hash. The first
failure raises :class:`AuditChainBroken` naming the sequence number and the damage:
``hash_mismatch``, ``broken_link``, ``gap``, ``checkpoint_mismatch``,
``bad_signature`` or ``truncated``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from requiem import digest
from requiem.control import audit_chain
from requiem.control.audit_chain import GENESIS, AuditChainBroken, entry_hash, ts_text
from requiem.control.audit_keys import Checkpoint, parse_public_pem, signature_valid
from requiem.errors import FileMissing, InvalidInput, RequiemError
from requiem.store.models import AuditCheckpoint, AuditEntry, AuditRun

_COLUMNS = (
    "seq, ts, actor, tenant_id, action, target, outcome, source, request_id, "
    "details, prev_hash, hash"
)
_FETCH = 5000


class AuditCheckpointInvalid(InvalidInput):
    code = "audit_checkpoint_invalid"


@dataclass
class VerifyReport:
    """What a successful walk covered."""

    checked: int = 0
    first_seq: int | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpoints: int = 0
    signatures_checked: bool = True
    key_source: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "checked": self.checked,
            "first_seq": self.first_seq,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "checkpoints": self.checkpoints,
            "signatures_checked": self.signatures_checked,
            "key_source": self.key_source,
        }


def _broken(seq: int, damage: str, message: str) -> AuditChainBroken:
    return AuditChainBroken(
        f"audit chain broken at seq {seq}: {message}", seq=seq, damage=damage
    )


def _check_checkpoint(
    checkpoint: Checkpoint, chain_hash: str, key: Ed25519PublicKey | None
) -> None:
    if key is not None and not signature_valid(key, checkpoint):
        msg = "checkpoint signature does not verify with the audit public key"
        raise _broken(checkpoint.seq, "bad_signature", msg)
    if checkpoint.head_hash != chain_hash:
        msg = (
            "the chain's hash differs from the one the checkpoint signed "
            "(history up to here was rewritten)"
        )
        raise _broken(checkpoint.seq, "checkpoint_mismatch", msg)


def walk(
    rows: Iterable[tuple[Any, ...]],
    *,
    start_seq: int,
    prev_hash: str,
    checkpoints: dict[int, list[Checkpoint]],
    key: Ed25519PublicKey | None,
    report: VerifyReport,
) -> VerifyReport:
    """Check ``rows`` (in ``_COLUMNS`` order, ascending) and the checkpoints."""
    expected, prev = start_seq, prev_hash
    hash_of, ts_of = entry_hash, ts_text
    for row in rows:
        seq, ts, actor, tenant, action, target, outcome, source, rid = row[:9]
        details, named_prev, stored = row[9:]
        if seq != expected:
            msg = f"entry {expected} is missing (next entry is {seq})"
            raise _broken(expected, "gap", msg)
        computed = hash_of(
            seq,
            named_prev,
            ts_of(ts),
            actor,
            tenant,
            action,
            target,
            outcome,
            source,
            rid,
            details,
        )
        if computed != stored:
            raise _broken(seq, "hash_mismatch", "the entry's content was changed")
        if named_prev != prev:
            msg = "the entry does not name its predecessor's hash"
            raise _broken(seq, "broken_link", msg)
        prev = computed
        expected += 1
        if seq in checkpoints:
            for checkpoint in checkpoints[seq]:
                _check_checkpoint(checkpoint, prev, key)
                report.checkpoints += 1
    head = expected - 1
    beyond = [seq for seq in checkpoints if seq > head]
    if beyond:
        msg = (
            f"a checkpoint covers entries up to {max(beyond)} but the chain "
            f"ends at {head}"
        )
        raise _broken(head + 1, "truncated", msg)
    report.checked = head - start_seq + 1
    report.first_seq = start_seq if report.checked else None
    report.head_seq = head
    report.head_hash = prev
    return report


def _rows(
    session: Session, from_seq: int, to_seq: int | None = None
) -> Iterator[tuple[Any, ...]]:
    """Entries ``from_seq``..``to_seq`` ascending, straight from the driver (fast)."""
    connection = session.connection().connection.dbapi_connection
    assert connection is not None
    upper = 2**63 - 1 if to_seq is None else to_seq
    where = "WHERE seq >= {0} AND seq <= {0} ORDER BY seq"
    if session.get_bind().dialect.name == "sqlite":
        cursor = connection.cursor()
        sql = f"SELECT {_COLUMNS} FROM audit_entries " + where.format("?")
    else:
        cursor = connection.cursor(name="requiem_audit_verify")  # server side
        sql = f"SELECT {_COLUMNS} FROM audit_entries " + where.format("%s")
    try:
        cursor.execute(sql, (from_seq, upper))
        while batch := cursor.fetchmany(_FETCH):
            yield from batch
    finally:
        cursor.close()


def _stored_checkpoints(session: Session, from_seq: int) -> dict[int, list[Checkpoint]]:
    found: dict[int, list[Checkpoint]] = {}
    rows = session.execute(
        select(AuditCheckpoint).where(AuditCheckpoint.seq >= from_seq)
    ).scalars()
    for row in rows:
        checkpoint = Checkpoint(
            row.seq, row.head_hash, ts_text(row.signed_at), row.key_id, row.signature
        )
        found.setdefault(row.seq, []).append(checkpoint)
    return found


def verify_database(
    factory: sessionmaker[Session],
    key: Ed25519PublicKey | None,
    *,
    from_seq: int = 1,
    against: Checkpoint | None = None,
) -> VerifyReport:
    """Walk the stored chain from ``from_seq``; raises AuditChainBroken on damage.

    With ``key`` None, checkpoint hashes are still compared but signatures are not
    checked (the report says so).
    """
    from_seq = max(1, from_seq)
    report = VerifyReport(signatures_checked=key is not None)
    with factory() as session, session.begin():
        prev, checkpoints = prepare(session, key, from_seq, against)
        flushed = flushed_head(session)
        walk(
            _rows(session, from_seq),
            start_seq=from_seq,
            prev_hash=prev,
            checkpoints=checkpoints,
            key=key,
            report=report,
        )
    check_not_shorter(report.head_seq, flushed)
    return report


def flushed_head(session: Session) -> int:
    """The head the latest flush left (read before the walk, so never ahead of it)."""
    run = session.get(AuditRun, "flush")
    return 0 if run is None else int(run.head_seq)


def check_not_shorter(head: int, flushed: int) -> None:
    """A chain shorter than a flush once made it lost its tail.

    This catches entries deleted after the latest checkpoint unless whoever deleted
    them also rewrote the flush record; a checkpoint kept elsewhere catches both.
    """
    if flushed > head:
        msg = f"the chain ends at {head} but a flush had linked entries up to {flushed}"
        raise _broken(head + 1, "truncated", msg)


def prepare(
    session: Session,
    key: Ed25519PublicKey | None,
    from_seq: int,
    against: Checkpoint | None,
) -> tuple[str, dict[int, list[Checkpoint]]]:
    """The hash entry ``from_seq`` must name, and the checkpoints to check."""
    if against is not None:
        _check_checkpoint(against, against.head_hash, key)
    prev = GENESIS
    if from_seq > 1:
        prev = session.execute(
            select(AuditEntry.hash).where(AuditEntry.seq == from_seq - 1)
        ).scalar_one_or_none()
        if prev is None:
            msg = f"entry {from_seq - 1} is missing"
            raise _broken(from_seq - 1, "gap", msg)
    checkpoints = _stored_checkpoints(session, from_seq)
    if against is not None and against.seq >= from_seq:
        checkpoints.setdefault(against.seq, []).append(against)
    return prev, checkpoints


def checkpoint_from_dict(value: Any, where: str) -> tuple[Checkpoint, str | None]:
    """A checkpoint and its embedded public key PEM from a file's JSON object."""
    try:
        checkpoint = Checkpoint(
            seq=int(value["seq"]),
            head_hash=str(value["head_hash"]),
            signed_at=str(value["signed_at"]),
            key_id=str(value["key_id"]),
            signature=str(value["signature"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"{where} is not an audit checkpoint (needs seq, head_hash, signature…)"
        raise AuditCheckpointInvalid(msg) from exc
    pem = value.get("public_key")
    return checkpoint, pem if isinstance(pem, str) else None


def read_checkpoint_file(path: Path) -> tuple[Checkpoint, str | None]:
    """The checkpoint saved by ``audit checkpoint --out`` at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise FileMissing(f"no checkpoint file at {path}", path=str(path)) from exc
    except OSError as exc:
        msg = f"cannot read checkpoint file {path}: {exc.strerror}"
        raise AuditCheckpointInvalid(msg) from exc
    try:
        value = digest.parse_json(raw)
    except RequiemError as exc:
        msg = f"checkpoint file {path} is not JSON: {exc.message}"
        raise AuditCheckpointInvalid(msg) from exc
    if not isinstance(value, dict):
        msg = f"checkpoint file {path} does not hold a JSON object"
        raise AuditCheckpointInvalid(msg)
    return checkpoint_from_dict(value, f"checkpoint file {path}")


def _export_row(value: Any, expected: int) -> tuple[Any, ...]:
    if not isinstance(value, dict) or not isinstance(value.get("details"), dict):
        raise _broken(expected, "hash_mismatch", "a line is not an audit entry")
    texts = [value.get(name) for name in audit_chain.FIELDS]
    required = [value.get(n) for n in ("ts", "action", "outcome", "prev_hash", "hash")]
    if (
        not all(t is None or isinstance(t, str) for t in texts)
        or not all(isinstance(t, str) for t in required)
        or type(value.get("seq")) is not int
    ):
        raise _broken(expected, "hash_mismatch", "a field of an entry has a bad type")
    try:
        return (
            int(value["seq"]),
            str(value["ts"]),
            *(value[name] for name in audit_chain.FIELDS[1:]),
            digest.canonical_json(value["details"]).decode("utf-8"),
            str(value["prev_hash"]),
            str(value["hash"]),
        )
    except (KeyError, TypeError, ValueError, RequiemError) as exc:
        msg = f"a line is not an audit entry ({type(exc).__name__})"
        raise _broken(expected, "hash_mismatch", msg) from exc


class _ExportLines:
    """The entries of an export file, read one line at a time; notes the checkpoint."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines = lines
        self.checkpoint: Checkpoint | None = None
        self.embedded_key: str | None = None
        self.last_seq = 0

    def entries(self) -> Iterator[tuple[Any, ...]]:
        for number, raw in enumerate(self._lines, start=1):
            expected = self.last_seq + 1 if self.last_seq else 0
            if self.checkpoint is not None:
                msg = "entries follow the export's closing checkpoint"
                raise _broken(self.checkpoint.seq + 1, "checkpoint_mismatch", msg)
            if not raw.endswith(b"\n"):
                raise _broken(expected, "truncated", f"line {number} is cut short")
            try:
                value = digest.parse_json(raw)
            except RequiemError as exc:
                msg = f"line {number} is not JSON"
                raise _broken(expected, "hash_mismatch", msg) from exc
            if isinstance(value, dict) and value.get("type") == "checkpoint":
                where = f"line {number}"
                self.checkpoint, self.embedded_key = checkpoint_from_dict(value, where)
                continue
            row = _export_row(value, expected)
            self.last_seq = row[0]
            yield row


def verify_export(
    lines: Iterable[bytes], trusted: Ed25519PublicKey | None
) -> VerifyReport:
    """Verify an ``audit export`` file on its own (no database needed), streaming.

    The file must end with a checkpoint signed at its last entry. The signature is
    checked with ``trusted`` when given, else with the public key the file carries
    (which proves integrity only if that key is the service's; the report says
    which key was used).
    """
    source = _ExportLines(lines)
    entries = source.entries()
    report = VerifyReport(signatures_checked=True, key_source="given")
    first = next(entries, None)
    if first is not None:
        walk(
            itertools.chain([first], entries),
            start_seq=first[0],
            prev_hash=first[10],
            checkpoints={},
            key=None,
            report=report,
        )

    checkpoint, last = source.checkpoint, source.last_seq
    if checkpoint is None:
        msg = "the export does not end with a signed checkpoint"
        raise _broken(last + 1, "truncated", msg)
    key = trusted
    if key is None:
        if source.embedded_key is None:
            msg = "no public key to check the checkpoint with"
            raise _broken(checkpoint.seq, "bad_signature", msg)
        key = parse_public_pem(source.embedded_key)
        report.key_source = "embedded"
    if checkpoint.seq < last:
        msg = f"entries after {checkpoint.seq} are not covered by the checkpoint"
        raise _broken(checkpoint.seq + 1, "checkpoint_mismatch", msg)
    if first is not None and checkpoint.seq > last:
        msg = f"the checkpoint covers entries up to {checkpoint.seq}; the file ends"
        raise _broken(last + 1, "truncated", f"{msg} at {last}")
    chain_hash = report.head_hash if first is not None else checkpoint.head_hash
    _check_checkpoint(checkpoint, chain_hash, key)
    report.checkpoints = 1
    return report


def export_line(row: dict[str, Any]) -> str:
    """One JSON Lines entry of an export: the hashed record plus its hash."""
    record = audit_chain.hashed_record(row)
    record["hash"] = row["hash"]
    record["type"] = "entry"
    return json.dumps(record, sort_keys=True, ensure_ascii=False)
