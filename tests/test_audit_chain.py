"""The audit chain: what a hash covers, linking, and every kind of tampering caught."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from requiem import digest
from requiem import settings as settings_module
from requiem.control import audit, audit_chain, audit_query, audit_service
from requiem.control.audit_chain import GENESIS, AuditChainBroken
from requiem.control.audit_keys import AuditSigner
from requiem.control.audit_verify import verify_database
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory
from requiem.store.models import AuditEntry, AuditPending


def open_sessions(url: str):
    """Sessions on a migrated database whose audit log starts empty.

    Migrating records an entry of its own; dropping it lets each test count from 1.
    """
    engine = make_engine(settings_module.load(), url)
    ensure_schema(engine)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        session.execute(text("DELETE FROM audit_pending"))
    return sessions


@pytest.fixture
def sqlite_sessions(home: Path):
    return open_sessions(f"sqlite:///{home / 'requiem.db'}")


@pytest.fixture
def signer(home: Path) -> AuditSigner:
    return AuditSigner.load(settings_module.load().audit_key_file)


def fill(sessions, count: int, **fields) -> None:
    for n in range(count):
        audit.record(
            sessions,
            "flag.set",
            actor=f"key:k{n % 3}",
            tenant_id=f"t_{n % 2}",
            target="execution_pause",
            source="cli",
            request_id=f"req-{n}",
            details={"n": n, "value": n % 2 == 0, "note": "é ☃ \u2028"},
            **fields,
        )


def link(sessions, signer=None):
    return audit_chain.link_pending(sessions, settings_module.load(), signer)


def broken(sessions, key=None, **kwargs) -> AuditChainBroken:
    with pytest.raises(AuditChainBroken) as caught:
        verify_database(sessions, key, **kwargs)
    return caught.value


def run_sql(sessions, statement: str, **params) -> None:
    with sessions() as session, session.begin():
        session.execute(text(statement), params)


def stored(sessions, seq: int) -> dict:
    with sessions() as session:
        row = session.get(AuditEntry, seq)
        return audit_query.stored_fields(row)


def hash_of(row: AuditEntry) -> str:
    """The hash ``row`` should carry for its current fields and ``prev_hash``."""
    return audit_chain.entry_hash(
        row.seq,
        row.prev_hash,
        audit_chain.ts_text(row.ts),
        row.actor,
        row.tenant_id,
        row.action,
        row.target,
        row.outcome,
        row.source,
        row.request_id,
        row.details,
    )


def rehash_from(sessions, seq: int) -> None:
    """What an attacker with write access does: recompute every hash after ``seq``."""
    with sessions() as session, session.begin():
        prev = GENESIS
        if seq > 1:
            prev = session.get(AuditEntry, seq - 1).hash
        rows = session.query(AuditEntry).filter(AuditEntry.seq >= seq)
        for row in rows.order_by(AuditEntry.seq):
            row.prev_hash = prev
            row.hash = prev = hash_of(row)


texts = st.one_of(st.none(), st.text(max_size=20))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(1 - 2**53, 2**53 - 1) | st.text(max_size=9),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(1 - 2**53, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=6), any_json, max_size=5))
def test_canonical_details_are_exactly_rfc8785(value):
    """The fast encoder for details agrees with the rfc8785 library, floats too."""
    assert audit.canonical_details(value) == digest.canonical_json(value)


@settings(max_examples=150, deadline=None)
@given(
    seq=st.integers(1, 2**53 - 1),
    actor=texts,
    tenant=texts,
    action=st.text(max_size=20),
    target=texts,
    details=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_entry_hash_is_of_record_over_the_entry(
    seq, actor, tenant, action, target, details
):
    """The fast encoder gives exactly of_record("audit", …) on arbitrary entries."""
    record = {
        "prev_hash": "ab" * 32,
        "seq": seq,
        "ts": "2026-01-02T03:04:05.000006Z",
        "actor": actor,
        "tenant_id": tenant,
        "action": action,
        "target": target,
        "outcome": "success",
        "source": None,
        "request_id": "r1",
        "details": details,
    }

    fast = audit_chain.entry_hash(
        seq,
        "ab" * 32,
        record["ts"],
        actor,
        tenant,
        action,
        target,
        "success",
        None,
        "r1",
        digest.canonical_json(details).decode("utf-8"),
    )

    assert fast == digest.of_record("audit", record)


def test_linked_entries_form_a_chain_from_genesis(database_url: str, signer):
    """Entries get seq 1..n, each names its predecessor, entry 1 names 64 zeros."""
    sessions = open_sessions(database_url)
    fill(sessions, 30)

    report = link(sessions, signer)

    assert (report.linked, report.head_seq) == (30, 30)
    first, second = stored(sessions, 1), stored(sessions, 2)
    assert first["prev_hash"] == GENESIS
    assert second["prev_hash"] == first["hash"]
    record = audit_chain.hashed_record(first)
    assert digest.of_record("audit", record) == first["hash"]
    assert record["details"] == {"n": 0, "value": True, "note": "é ☃ \u2028"}
    result = verify_database(sessions, signer.public_key)
    assert (result.checked, result.head_seq, result.checkpoints) == (30, 30, 1)
    with sessions() as session:
        assert session.query(AuditPending).count() == 0


def test_a_checkpoint_is_signed_every_n_entries(home: Path, monkeypatch, signer):
    """EVERY=10, five flushes of 5: checkpoints at 5 (the first), 15 and 25."""
    monkeypatch.setenv("REQUIEM_AUDIT_CHECKPOINT_EVERY", "10")
    monkeypatch.setenv("REQUIEM_AUDIT_CHECKPOINT_INTERVAL_S", "3600")
    sessions = open_sessions(f"sqlite:///{home / 'requiem.db'}")

    seqs = []
    for _ in range(5):
        fill(sessions, 5)
        report = link(sessions, signer)
        seqs.append(report.checkpoint_seq)

    assert seqs == [5, None, 15, None, 25]
    assert verify_database(sessions, signer.public_key).checkpoints == 3


def test_a_checkpoint_falls_due_after_the_interval(home: Path, monkeypatch, signer):
    """INTERVAL_S=0: any flush with new entries is signed; one with none is not."""
    monkeypatch.setenv("REQUIEM_AUDIT_CHECKPOINT_INTERVAL_S", "0")
    sessions = open_sessions(f"sqlite:///{home / 'requiem.db'}")
    fill(sessions, 2)
    link(sessions, signer)
    fill(sessions, 1)

    with_new = link(sessions, signer)
    without_new = link(sessions, signer)

    assert with_new.checkpoint_seq == 3
    assert without_new.checkpoint_seq is None


def test_editing_an_entry_is_a_hash_mismatch(sqlite_sessions, signer):
    fill(sqlite_sessions, 10)
    link(sqlite_sessions, signer)

    run_sql(
        sqlite_sessions, "UPDATE audit_entries SET actor = 'key:evil' WHERE seq = 4"
    )

    exc = broken(sqlite_sessions, signer.public_key)
    assert (exc.seq, exc.damage, exc.code, exc.exit_code) == (
        4,
        "hash_mismatch",
        "audit_chain_broken",
        4,
    )


def test_editing_details_is_a_hash_mismatch(sqlite_sessions):
    fill(sqlite_sessions, 5)
    link(sqlite_sessions)

    run_sql(
        sqlite_sessions,
        "UPDATE audit_entries SET details = :d WHERE seq = 2",
        d='{"n":99}',
    )

    assert (broken(sqlite_sessions).seq, broken(sqlite_sessions).damage) == (
        2,
        "hash_mismatch",
    )


def test_an_edit_with_its_own_hash_recomputed_is_a_broken_link(sqlite_sessions):
    fill(sqlite_sessions, 6)
    link(sqlite_sessions)
    run_sql(
        sqlite_sessions, "UPDATE audit_entries SET outcome = 'failure' WHERE seq = 3"
    )
    with sqlite_sessions() as session:
        fixed = hash_of(session.get(AuditEntry, 3))

    run_sql(
        sqlite_sessions, "UPDATE audit_entries SET hash = :h WHERE seq = 3", h=fixed
    )

    exc = broken(sqlite_sessions)
    assert (exc.seq, exc.damage) == (4, "broken_link")


def test_deleting_an_entry_is_a_gap(database_url: str):
    sessions = open_sessions(database_url)
    fill(sessions, 8)
    link(sessions)

    run_sql(sessions, "DELETE FROM audit_entries WHERE seq = 5")

    exc = broken(sessions)
    assert (exc.seq, exc.damage) == (5, "gap")


def test_deleting_the_first_entry_is_a_gap(sqlite_sessions):
    fill(sqlite_sessions, 3)
    link(sqlite_sessions)

    run_sql(sqlite_sessions, "DELETE FROM audit_entries WHERE seq = 1")

    assert (broken(sqlite_sessions).seq, broken(sqlite_sessions).damage) == (1, "gap")


def test_inserting_an_entry_breaks_the_chain_where_it_went(sqlite_sessions):
    """Shift entries 4.. up by one and slip a well-formed entry in at 4."""
    fill(sqlite_sessions, 6)
    link(sqlite_sessions)
    run_sql(sqlite_sessions, "UPDATE audit_entries SET seq = seq + 100 WHERE seq >= 4")
    run_sql(sqlite_sessions, "UPDATE audit_entries SET seq = seq - 99 WHERE seq >= 100")
    third = stored(sqlite_sessions, 3)
    forged = dict(third, seq=4, actor="key:evil", prev_hash=third["hash"])
    forged["hash"] = digest.of_record("audit", audit_chain.hashed_record(forged))
    forged["ts"] = audit_chain.parse_ts(audit_chain.ts_text(third["ts"]))
    with sqlite_sessions() as session, session.begin():
        session.add(AuditEntry(**forged))

    exc = broken(sqlite_sessions)
    assert (exc.seq, exc.damage) == (5, "hash_mismatch")


def test_swapping_two_entries_is_a_hash_mismatch(sqlite_sessions):
    fill(sqlite_sessions, 6)
    link(sqlite_sessions)

    run_sql(sqlite_sessions, "UPDATE audit_entries SET seq = -1 WHERE seq = 2")
    run_sql(sqlite_sessions, "UPDATE audit_entries SET seq = 2 WHERE seq = 3")
    run_sql(sqlite_sessions, "UPDATE audit_entries SET seq = 3 WHERE seq = -1")

    exc = broken(sqlite_sessions)
    assert (exc.seq, exc.damage) == (2, "hash_mismatch")


def test_cutting_the_tail_below_a_checkpoint_is_truncated(database_url: str, signer):
    sessions = open_sessions(database_url)
    fill(sessions, 12)
    link(sessions, signer)

    run_sql(sessions, "DELETE FROM audit_entries WHERE seq > 9")

    exc = broken(sessions, signer.public_key)
    assert (exc.seq, exc.damage) == (10, "truncated")


def test_cutting_the_tail_past_the_last_checkpoint_is_truncated(sqlite_sessions):
    """No checkpoint covers entries 9-12, but the last flush had linked them."""
    fill(sqlite_sessions, 12)
    link(sqlite_sessions)

    run_sql(sqlite_sessions, "DELETE FROM audit_entries WHERE seq > 8")

    exc = broken(sqlite_sessions)
    assert (exc.seq, exc.damage) == (9, "truncated")


def test_rewriting_every_hash_after_an_edit_is_caught_by_a_checkpoint(
    database_url: str, signer
):
    """The chain is self-consistent again, but the signed head no longer matches."""
    sessions = open_sessions(database_url)
    fill(sessions, 12)
    link(sessions, signer)
    run_sql(sessions, "UPDATE audit_entries SET actor = 'key:evil' WHERE seq = 3")

    rehash_from(sessions, 3)

    exc = broken(sessions, signer.public_key)
    assert (exc.seq, exc.damage) == (12, "checkpoint_mismatch")


def test_a_forged_checkpoint_signature_is_bad_signature(sqlite_sessions, signer):
    """Rewrite history, then re-sign the checkpoint with a key of one's own."""
    fill(sqlite_sessions, 5)
    link(sqlite_sessions, signer)
    run_sql(
        sqlite_sessions, "UPDATE audit_entries SET actor = 'key:evil' WHERE seq = 1"
    )
    rehash_from(sqlite_sessions, 1)
    head = stored(sqlite_sessions, 5)["hash"]
    forger = AuditSigner(Ed25519PrivateKey.generate())
    fake = forger.sign(5, head, "2026-01-01T00:00:00.000000Z")

    run_sql(
        sqlite_sessions,
        "UPDATE audit_checkpoints SET head_hash = :h, signature = :s WHERE seq = 5",
        h=head,
        s=fake.signature,
    )

    exc = broken(sqlite_sessions, signer.public_key)
    assert (exc.seq, exc.damage) == (5, "bad_signature")


def test_verify_from_a_sequence_number_starts_there(sqlite_sessions):
    """--from 6 trusts entry 5's hash and checks 6 onwards only."""
    fill(sqlite_sessions, 10)
    link(sqlite_sessions)
    run_sql(sqlite_sessions, "UPDATE audit_entries SET actor = 'x' WHERE seq = 2")

    report = verify_database(sqlite_sessions, None, from_seq=6)

    assert (report.checked, report.first_seq, report.head_seq) == (5, 6, 10)
    assert broken(sqlite_sessions).seq == 2


def test_an_unreadable_pending_row_is_linked_as_evidence(sqlite_sessions):
    """A damaged pending row must not block the chain; its digest is kept instead."""
    fill(sqlite_sessions, 1)
    with sqlite_sessions() as session, session.begin():
        session.add(AuditPending(entry="{not json", created_at=audit_chain.utcnow()))
    fill(sqlite_sessions, 1)

    report = link(sqlite_sessions)

    assert report.linked == 3
    evidence = stored(sqlite_sessions, 2)
    assert evidence["action"] == "audit.pending_unreadable"
    assert json.loads(evidence["details"]) == {"digest": digest.of_bytes(b"{not json")}
    assert verify_database(sqlite_sessions, None).checked == 3


def test_over_long_fields_are_cut_to_their_column(database_url: str):
    """PostgreSQL would refuse an over-long value at link time; record cuts it."""
    sessions = open_sessions(database_url)
    audit.record(sessions, "a" * 100, target="t" * 1000, source="s" * 100)

    link(sessions)

    row = stored(sessions, 1)
    assert (len(row["action"]), len(row["target"]), len(row["source"])) == (
        64,
        256,
        64,
    )
    assert row["target"].endswith("…")


def test_details_that_are_not_json_are_refused_at_record(sqlite_sessions):
    with pytest.raises(Exception) as caught:
        audit.record(sqlite_sessions, "x", details={"bad": float("nan")})

    assert getattr(caught.value, "code", None) == "json_parse_error"


def test_status_reports_head_lag_flush_checkpoint_and_verification(
    sqlite_sessions, signer
):
    fill(sqlite_sessions, 4)
    link(sqlite_sessions, signer)
    fill(sqlite_sessions, 2)
    audit_service.verify(sqlite_sessions, signer.public_key)

    document = audit_service.status(sqlite_sessions)

    assert document["head_seq"] == 4
    assert document["pending"] == 2
    assert document["lag_s"] >= 0
    assert document["last_flush"]["count"] == 4
    assert document["last_checkpoint"]["seq"] == 4
    assert document["last_verification"]["ok"] is True
    assert document["last_verification"]["checked"] == 4


def test_the_service_flushes_in_the_background_and_on_stop(sqlite_sessions):
    service = audit.AuditService(sqlite_sessions, settings_module.load())
    service.start()
    try:
        fill(sqlite_sessions, 3)
        for _ in range(300):
            if service.pending()["count"] == 0:
                break
            time.sleep(0.02)
        assert service.pending()["count"] == 0
        fill(sqlite_sessions, 2)
    finally:
        report = service.stop()

    assert service.pending() == {"count": 0, "oldest_age_s": 0.0}
    assert report.head_seq == 5
    assert service.status()["flusher"]["running"] is False


def parallel(sessions, key=None, **kwargs):
    return audit_service.verify(sessions, key, workers=3, parallel_min=1, **kwargs)


def test_a_parallel_walk_reports_what_one_walk_does(database_url: str, signer):
    """Spans 1-10, 11-20, 21-30 on three processes: same report, checkpoints too."""
    sessions = open_sessions(database_url)
    fill(sessions, 30)
    link(sessions, signer)

    report = parallel(sessions, signer.public_key)

    single = verify_database(sessions, signer.public_key)
    assert (report.checked, report.head_seq, report.head_hash) == (
        single.checked,
        single.head_seq,
        single.head_hash,
    )
    assert report.checkpoints == single.checkpoints == 1


@pytest.mark.parametrize(
    ("sql", "seq", "damage"),
    [
        ("UPDATE audit_entries SET actor = 'x' WHERE seq = 11", 11, "hash_mismatch"),
        ("UPDATE audit_entries SET actor = 'x' WHERE seq = 25", 25, "hash_mismatch"),
        ("DELETE FROM audit_entries WHERE seq = 10", 10, "gap"),
        ("DELETE FROM audit_entries WHERE seq = 11", 11, "gap"),
        ("UPDATE audit_entries SET prev_hash = :h WHERE seq = 21", 21, "hash_mismatch"),
        ("DELETE FROM audit_entries WHERE seq > 28", 29, "truncated"),
    ],
)
def test_a_parallel_walk_finds_damage_at_and_between_spans(
    sqlite_sessions, signer, sql, seq, damage
):
    fill(sqlite_sessions, 30)
    link(sqlite_sessions, signer)

    run_sql(sqlite_sessions, sql, h="0" * 64)

    with pytest.raises(AuditChainBroken) as caught:
        parallel(sqlite_sessions, signer.public_key)
    assert (caught.value.seq, caught.value.damage) == (seq, damage)


def test_a_parallel_walk_catches_a_rehashed_span_at_its_border(sqlite_sessions):
    """Entry 15 edited and 11-30 re-hashed from a forged 11: the link 10→11 breaks."""
    fill(sqlite_sessions, 30)
    link(sqlite_sessions)
    run_sql(
        sqlite_sessions,
        "UPDATE audit_entries SET prev_hash = :h WHERE seq = 11",
        h="1" * 64,
    )
    with sqlite_sessions() as session, session.begin():
        row = session.get(AuditEntry, 11)
        row.hash = hash_of(row)
    rehash_from(sqlite_sessions, 12)

    with pytest.raises(AuditChainBroken) as caught:
        parallel(sqlite_sessions)
    assert (caught.value.seq, caught.value.damage) == (11, "broken_link")
    assert broken(sqlite_sessions).seq == 11
