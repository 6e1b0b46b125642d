"""Group commit: concurrent writes share commits; a failing write fails alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from requiem import settings
from requiem.control.group_commit import GroupCommitter
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory
from requiem.store.models import Flag


@pytest.fixture
def sessions(database_url: str):
    engine = make_engine(settings.load({}), database_url)
    ensure_schema(engine)
    yield session_factory(engine)
    engine.dispose()


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
