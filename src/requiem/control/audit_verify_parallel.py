"""Verifying a long audit chain on several cores at once.

One process walks a few hundred thousand entries a second, most of it Python work
per entry, so a long chain is cut into spans walked by forked processes. Each span
trusts the ``prev_hash`` its first entry names; the parent then checks that this is
the hash the span before it ended with, so the spans together prove exactly what one
walk would, and the first damage is reported the same way.
"""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from requiem import settings
from requiem.control.audit_chain import AuditChainBroken
from requiem.control.audit_keys import Checkpoint
from requiem.control.audit_verify import (
    VerifyReport,
    _rows,
    check_not_shorter,
    flushed_head,
    prepare,
    walk,
)
from requiem.store.db import make_engine, session_factory
from requiem.store.models import AuditEntry

# Below this many entries starting processes costs more than it saves.
PARALLEL_MIN = 200_000


@dataclass(frozen=True)
class Span:
    """What one process found walking entries ``lo``..``hi``."""

    lo: int
    hi: int
    first_prev: str | None = None
    last_hash: str | None = None
    checked: int = 0
    checkpoints: int = 0
    error: tuple[int, str, str] | None = None  # seq, damage, message


def _walk_span(
    url: str,
    lo: int,
    hi: int,
    prev: str | None,
    checkpoints: dict[int, list[Checkpoint]],
    key_raw: bytes | None,
) -> Span:
    engine = make_engine(settings.load(), url)
    key = Ed25519PublicKey.from_public_bytes(key_raw) if key_raw else None
    try:
        with session_factory(engine)() as session, session.begin():
            rows = _rows(session, lo, hi)
            first = next(rows, None)
            if first is None:
                return Span(lo, hi, error=(lo, "gap", f"entry {lo} is missing"))
            report = VerifyReport()
            try:
                walk(
                    itertools.chain([first], rows),
                    start_seq=lo,
                    prev_hash=first[10] if prev is None else prev,
                    checkpoints=checkpoints,
                    key=key,
                    report=report,
                )
            except AuditChainBroken as exc:
                return Span(lo, hi, first[10], error=(exc.seq, exc.damage, exc.message))
            if report.head_seq != hi:
                seq = report.head_seq + 1
                return Span(
                    lo, hi, first[10], error=(seq, "gap", f"entry {seq} is missing")
                )
            return Span(
                lo, hi, first[10], report.head_hash, report.checked, report.checkpoints
            )
    finally:
        engine.dispose()


def _spans(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    size = -(-(hi - lo + 1) // parts)
    return [(start, min(hi, start + size - 1)) for start in range(lo, hi + 1, size)]


def verify(
    factory: sessionmaker[Session],
    key: Ed25519PublicKey | None,
    *,
    from_seq: int = 1,
    against: Checkpoint | None = None,
    workers: int = 2,
    parallel_min: int = PARALLEL_MIN,
) -> VerifyReport | None:
    """The report of a walk on ``workers`` processes; None if the chain is too
    short to be worth it (the caller then walks it in one process)."""
    from_seq = max(1, from_seq)
    with factory() as session, session.begin():
        head = session.execute(select(func.max(AuditEntry.seq))).scalar() or 0
        if workers < 2 or head - from_seq + 1 < parallel_min:
            return None
        prev, checkpoints = prepare(session, key, from_seq, against)
        flushed = flushed_head(session)
        url = session.get_bind().url.render_as_string(hide_password=False)
    key_raw = None
    if key is not None:
        key_raw = key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    bounds = _spans(from_seq, head, workers)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(len(bounds), mp_context=context) as pool:
        futures = [
            pool.submit(
                _walk_span,
                url,
                lo,
                hi,
                prev if lo == from_seq else None,
                {s: c for s, c in checkpoints.items() if lo <= s <= hi},
                key_raw,
            )
            for lo, hi in bounds
        ]
        spans = [future.result() for future in futures]

    report = VerifyReport(signatures_checked=key is not None, first_seq=from_seq)
    ended: str | None = None
    for span in spans:
        if span.error is not None and span.error[0] == span.lo:
            raise AuditChainBroken(
                span.error[2], seq=span.error[0], damage=span.error[1]
            )
        if ended is not None and span.first_prev != ended:
            msg = (
                f"audit chain broken at seq {span.lo}: the entry does not name its "
                "predecessor's hash"
            )
            raise AuditChainBroken(msg, seq=span.lo, damage="broken_link")
        if span.error is not None:
            raise AuditChainBroken(
                span.error[2], seq=span.error[0], damage=span.error[1]
            )
        ended = span.last_hash
        report.checked += span.checked
        report.checkpoints += span.checkpoints

    beyond = [seq for seq in checkpoints if seq > head]
    if beyond:
        msg = (
            f"audit chain broken at seq {head + 1}: a checkpoint covers entries up "
            f"to {max(beyond)} but the chain ends at {head}"
        )
        raise AuditChainBroken(msg, seq=head + 1, damage="truncated")
    check_not_shorter(head, flushed)
    report.head_seq = head
    report.head_hash = ended or prev
    return report
