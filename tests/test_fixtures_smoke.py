"""The shared fixtures give each test its own real database."""

from sqlalchemy import text

from requiem import settings
from requiem.store import db


def test_database_url_is_private_and_reachable(database_url, home):
    engine = db.make_engine(settings.load(), database_url)

    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()
