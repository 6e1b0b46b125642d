"""Flags in the database: audited changes, one-second cache, unknown names."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from control_fixtures import migrated_sessions  # noqa: F401 - the sessions fixture
from requiem.control import flags
from requiem.store.db import transaction
from requiem.store.models import AuditPending


def test_a_change_records_who_old_and_new(sessions):
    with transaction(sessions) as session:
        first = flags.write(session, "execution_pause", True, actor="key:key_a")
    with transaction(sessions) as session:
        second = flags.write(session, "execution_pause", False, actor="key:key_b")

    with sessions() as session:
        state = flags.read(session, "execution_pause")
        entries = [json.loads(r.entry) for r in session.scalars(select(AuditPending))]

    assert first[0] is False and second[0] is True
    assert state.value is False and state.updated_by == "key:key_b"
    changes = [e for e in entries if e["action"] == "flag.set"]
    assert [(e["actor"], json.loads(e["details_json"])) for e in changes] == [
        ("key:key_a", {"old": False, "new": True}),
        ("key:key_b", {"old": True, "new": False}),
    ]


def test_unknown_flag_is_404_unknown_flag(sessions):
    with sessions() as session, pytest.raises(flags.UnknownFlag) as unknown:
        flags.read(session, "turbo")

    assert (unknown.value.code, unknown.value.http_status) == ("unknown_flag", 404)


def test_the_cache_rereads_the_database_after_its_ttl(sessions):
    now = [100.0]
    cache = flags.FlagCache(sessions, ttl=1.0, clock=lambda: now[0])
    assert cache.values()["maintenance"] is False

    with transaction(sessions) as session:
        flags.write(session, "maintenance", True, actor="test")
    now[0] += 0.5
    stale = cache.values()["maintenance"]
    now[0] += 0.6
    fresh = cache.values()["maintenance"]

    assert (stale, fresh) == (False, True)
