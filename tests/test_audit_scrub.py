"""Secrets are removed before an entry is written: by key name and by value shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import PurePosixPath
from uuid import UUID

import pytest

from requiem.control.audit import pending_entry
from requiem.control.audit_scrub import REDACTED, is_secret_name, scrub, scrub_text

API_KEY = "rqm_" + "k" * 43
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1XzEifQ.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "db_password",
        "passwordHash",
        "token",
        "refreshToken",
        "access_token",
        "client_secret",
        "api_key",
        "x-api-key",
        "apikey",
        "private_key",
        "key",
        "Authorization",
        "Set-Cookie",
        "credentials",
        "pwd",
    ],
)
def test_secret_names(name: str):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["key_id", "key_prefix", "prefix", "role", "name", "tenant_id", "monkey"]
)
def test_names_that_only_name_a_key_are_kept(name: str):
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"key {API_KEY} used", f"key {REDACTED} used"),
        (f"Bearer {JWT}", REDACTED),
        (f"token={JWT}", f"token={REDACTED}"),
        ("bearer abcdefgh12345678", REDACTED),
        ("basic configuration", "basic configuration"),
        (
            "postgresql://app:hunter2@db:5432/requiem",
            f"postgresql://app:{REDACTED}@db:5432/requiem",
        ),
        ("https://example.test/path?q=1", "https://example.test/path?q=1"),
        ("rqm_AbCdEfGh", "rqm_AbCdEfGh"),
        ("plain words", "plain words"),
    ],
)
def test_secret_shaped_values(value: str, expected: str):
    assert scrub_text(value) == expected


def test_scrub_walks_nested_objects_and_lists():
    details = {
        "user": {"password": "p", "email": "a@b.c"},
        "headers": [{"Authorization": "x"}, {"accept": "json"}],
        "argv": ["--db", "postgres://u:p4ss@h/d"],
        "Authorization": "Basic dXNlcjpwYXNzd29yZA==",
        "count": 3,
    }

    assert scrub(details) == {
        "user": {"password": REDACTED, "email": "a@b.c"},
        "headers": [{"Authorization": REDACTED}, {"accept": "json"}],
        "argv": ["--db", f"postgres://u:{REDACTED}@h/d"],
        "Authorization": REDACTED,
        "count": 3,
    }


def test_every_field_of_an_entry_is_scrubbed():
    """Not only details: a key passed as actor or target by mistake is removed too."""
    entry = json.loads(
        pending_entry(
            "api_key.use",
            actor=API_KEY,
            target=f"Bearer {JWT}",
            request_id=API_KEY,
            details={"secret": "s", "note": API_KEY},
        )
    )

    text = json.dumps(entry)
    assert API_KEY not in text
    assert JWT not in text
    assert entry["actor"] == REDACTED
    assert json.loads(entry["details_json"]) == {"note": REDACTED, "secret": REDACTED}


def test_common_python_values_become_text():
    """Amounts, times and ids in details are kept as text, not refused."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    cleaned = scrub(
        {
            "amount": Decimal("12.50"),
            "at": moment,
            "id": UUID(int=1),
            "path": PurePosixPath("/a/b"),
            "tags": ("x", "y"),
        }
    )

    assert cleaned == {
        "amount": "12.50",
        "at": "2026-01-02T03:04:05+00:00",
        "id": "00000000-0000-0000-0000-000000000001",
        "path": "/a/b",
        "tags": ["x", "y"],
    }
