"""PostgreSQL session settings of make_engine (router/db/engine.py): a commit that waits
on another session's row lock fails after the lock timeout instead of waiting without
end (a listener answers 0xA700 then; catalogue FI-11/FI-12 neighbourhood)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from db_support import new_instance
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from router.db import engine as engine_module
from router.db.engine import make_engine
from router.db.repository import Repository

pytestmark = pytest.mark.postgresql


def test_every_session_has_the_lock_timeout(pg_database: Callable[..., str]) -> None:
    engine = make_engine(pg_database())
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "10s"
    finally:
        engine.dispose()


def test_a_commit_behind_a_held_row_lock_fails_after_the_lock_timeout(
    pg_database: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "LOCK_TIMEOUT_MS", 300)
    url = pg_database()
    engine = make_engine(url)
    other = make_engine(url)
    try:
        repository = Repository(engine, clock=lambda: dt.datetime.now(dt.UTC))
        repository.add_destination("pacs", "PACS", "10.0.0.5", 104)
        with other.connect() as holder, holder.begin():
            # The jobs row's foreign-key check needs a share lock on this row.
            holder.execute(text("SELECT id FROM destinations WHERE name = 'pacs' FOR UPDATE"))
            # (Had it waited, the holder's idle-in-transaction timeout would have ended
            # the lock after 10 s and the insert would have gone through, not raised.)
            with pytest.raises(OperationalError, match="lock timeout"):
                repository.record_instances([new_instance(1, "pacs")])
        repository.record_instances([new_instance(2, "pacs")])  # and the next commit goes through
    finally:
        engine.dispose()
        other.dispose()
