"""Group commit: concurrent writes share commits; a failing write fails alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from control_fixtures import migrated_sessions  # noqa: F401 - the sessions fixture
from requiem.control.group_commit import GroupCommitter
from requiem.store.models import Flag


def test_every_write_is_durable_and_a_bad_one_fails_alone(sessions):
    writer = GroupCommitter(sessions)

    def add(name: str):
        def work(session):
            if name == "bad":
                raise ValueError("refused")
            session.add(Flag(name=name, value=True))
            return name

        return work

    names = [f"flag_{n}" for n in range(40)] + ["bad"]
    with ThreadPoolExecutor(16) as pool:
        futures = {n: pool.submit(writer.write, add(n)) for n in names}
    writer.close()

    with sessions() as session:
        stored = session.scalar(select(func.count()).select_from(Flag))
    assert [futures[n].result() for n in names[:-1]] == names[:-1]
    with pytest.raises(ValueError, match="refused"):
        futures["bad"].result()
    assert stored == 40
