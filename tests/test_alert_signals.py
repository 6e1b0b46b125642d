"""The metrics the P0 alerts watch move when their event happens."""

from __future__ import annotations

import pytest

from requiem import settings
from requiem.cas import LocalCAS
from requiem.cas.objects import INTEGRITY_FAILURES, CasIntegrityFailed
from requiem.engine import Engine, ExecutionRequest
from requiem.engine.replay import DRIFT_DETECTED


def test_a_replay_that_drifts_counts_one_determinism_violation(home):
    config = settings.load()
    engine = Engine(LocalCAS.from_settings(config), config)
    reader = '{"command": "sh", "argv": ["-c", "head -c 8 /dev/urandom | od -An"]}'
    stable = '{"command": "sh", "argv": ["-c", "echo same"]}'
    before = DRIFT_DETECTED._value.get()

    drifted = engine.replay(engine.run(ExecutionRequest.parse(reader)))
    held = engine.replay(engine.run(ExecutionRequest.parse(stable)))

    assert (drifted.ok, held.ok) == (False, True)
    assert DRIFT_DETECTED._value.get() == before + 1


def test_a_corrupt_cas_read_counts_one_integrity_failure(home):
    cas = LocalCAS.from_settings(settings.load())
    digest = cas.put_bytes(b"evidence\n" * 100, durable=False)
    cas.blob_path(digest).write_bytes(b"tampered")
    before = INTEGRITY_FAILURES._value.get()

    with pytest.raises(CasIntegrityFailed):
        cas.get_bytes(digest)

    assert INTEGRITY_FAILURES._value.get() == before + 1
