"""The metrics the P0 alerts watch move when their event happens."""

from __future__ import annotations

from requiem import settings
from requiem.cas import LocalCAS
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
