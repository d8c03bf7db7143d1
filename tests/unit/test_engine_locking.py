"""SQLite write transactions (router/db/engine.py): BEGIN IMMEDIATE waits for another
connection's write lock in short steps, gives up after the busy timeout with SQLite's
"database is locked", and leaves the connection's busy timeout as it was."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from router.db import engine as engine_module
from router.db.engine import BUSY_TIMEOUT_MS, WRITE_OPTION, make_engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (n INTEGER)"))
    yield engine
    engine.dispose()


def _hold_write_lock(path: str, seconds: float, held: threading.Event) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    held.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


def test_a_writer_waits_for_the_lock_and_then_writes(engine: Engine) -> None:
    held = threading.Event()
    holder = threading.Thread(
        target=_hold_write_lock, args=(engine.url.database, 0.3, held), daemon=True
    )
    holder.start()
    assert held.wait(10)
    writer = engine.execution_options(**{WRITE_OPTION: True})
    with writer.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (2)"))
        timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    holder.join(10)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT n FROM t ORDER BY n")).scalars().all() == [1, 2]
    assert timeout == BUSY_TIMEOUT_MS  # restored once the lock was taken


def test_a_writer_gives_up_after_the_busy_timeout(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 200)
    held = threading.Event()
    holder = threading.Thread(
        target=_hold_write_lock, args=(engine.url.database, 2.0, held), daemon=True
    )
    holder.start()
    assert held.wait(10)
    writer = engine.execution_options(**{WRITE_OPTION: True})
    with pytest.raises(OperationalError, match="locked"), writer.begin():
        pass
    holder.join(10)
    with engine.connect() as connection:  # the pooled connection works, its timeout as set
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 200


def test_only_an_engine_made_not_durable_skips_the_wal_fsync(tmp_path: Path) -> None:
    """The dispatcher's leases commit with synchronous=NORMAL; everything else FULL."""
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    for durable, expected in ((True, 2), (False, 1)):  # PRAGMA synchronous: 2 FULL, 1 NORMAL
        engine = make_engine(url, durable=durable)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == expected
        engine.dispose()


def test_a_listener_engine_never_checkpoints_and_checkpoint_wal_does(tmp_path: Path) -> None:
    from router.db.engine import checkpoint_wal

    url = f"sqlite:///{tmp_path / 'wal.sqlite'}"
    listener = make_engine(url, checkpoints=False)
    try:
        with listener.begin() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
            connection.execute(text("CREATE TABLE t (n INTEGER)"))
        for n in range(1200):  # past the 1,000 pages that would have checkpointed
            with listener.begin() as connection:
                connection.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
        database, log = tmp_path / "wal.sqlite", tmp_path / "wal.sqlite-wal"
        # 1,200 commits of a page or two: the log was never reset by a checkpoint.
        assert log.stat().st_size > 1100 * 4096
        before = database.stat().st_size
        checkpoint_wal(listener)
        after = database.stat().st_size
    finally:
        listener.dispose()
    assert before <= 2 * 4096 < after  # the rows' pages were copied into the database
