"""Engines and sessions: the one place that knows how to talk to SQLite and PostgreSQL.

SQLite (the default, one file in the data directory) is shared by several processes, so
every connection gets, before anything else runs on it:

- ``journal_mode=WAL``: readers never block the writer and the writer never blocks them;
- ``synchronous=FULL``: a commit is on disk when it returns (DESIGN §3.1: the C-STORE
  success is sent only after it) — WAL's default ``NORMAL`` could lose the last commits
  on power loss;
- ``foreign_keys=ON``: SQLite ignores foreign keys unless asked, per connection;
- ``busy_timeout=10000``: wait up to 10 s for another process's write lock.

Transactions: the ``sqlite3`` module's legacy transaction control emits no BEGIN before a
SELECT or DDL, so SQLAlchemy's documented recipe is used instead (``isolation_level =
None`` on the DBAPI connection and our own BEGIN in the ``begin`` event; SQLAlchemy docs,
"Transactions with SQLite and the sqlite3 driver"). A write transaction begins with
``BEGIN IMMEDIATE``: a deferred transaction that reads and then writes must upgrade its
lock, and in WAL mode that upgrade fails at once with SQLITE_BUSY (the busy timeout does
not apply) when another process wrote in between. Taking the write lock at BEGIN makes
the busy timeout cover every wait (polled in short steps: ``_begin_immediate``).
Sessions from ``make_session_factory(engine, write=True)`` do that; read-only ones begin
a plain deferred transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)

#: The SQLite file inside the node's data directory (the same name as Settings uses).
SQLITE_FILENAME = "router.sqlite"
BUSY_TIMEOUT_MS = 10_000
#: Execution option set on the engine behind write sessions: BEGIN IMMEDIATE on SQLite.
WRITE_OPTION = "dicom_router_write"


IDLE_IN_TRANSACTION_MS = 10_000  # no transaction of ours idles this long between statements
#: PostgreSQL: a statement waiting this long for a row lock fails (a listener then answers
#: 0xA700 instead of holding the modality's C-STORE until the peer gives up).
LOCK_TIMEOUT_MS = 10_000


def sqlite_pragmas(
    *, foreign_keys: bool = True, durable: bool = True, checkpoints: bool = True
) -> tuple[str, ...]:
    """The statements run on every new SQLite connection (``durable``, ``checkpoints``:
    see make_engine)."""
    return (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}",
        f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}",
        f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        *(() if checkpoints else ("PRAGMA wal_autocheckpoint=0",)),
    )


def sqlite_url_for(data_dir: str | Path) -> str:
    """The URL of the node's SQLite database in ``data_dir`` (absolute)."""
    return f"sqlite:///{(Path(data_dir) / SQLITE_FILENAME).resolve()}"


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL, or None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def redacted(url: str | URL) -> str:
    """The URL with its password hidden, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(
    url: str | URL,
    *,
    foreign_keys: bool = True,
    durable: bool = True,
    checkpoints: bool = True,
    **kwargs: Any,
) -> Engine:
    """An engine for ``url`` with the settings above applied to every new connection.

    ``foreign_keys=False`` is for migrations only: SQLite's batch mode copies and drops
    tables, which foreign-key enforcement would turn into cascades or failures.

    ``durable=False`` is for the dispatcher's leases and the workers' results: on SQLite
    their commits skip the WAL fsync (``synchronous=NORMAL``: still atomic; after a power
    loss the latest of them may be rolled back, and a lease or a result rolled back is
    only a job due again, so delivery stays at least once). The next durable commit of
    any process fsyncs the WAL with those frames in it, and the janitor calls
    ``sync_wal`` before it removes the spool file of an instance a result marked done.
    Instance and job commits stay ``FULL`` (DESIGN §3.1); PostgreSQL keeps
    ``synchronous_commit=on`` for every connection.

    ``checkpoints=False`` is for the listener: its commits never run a WAL checkpoint
    (SQLite runs one inside the commit that takes the log past 1,000 pages: copying
    them into the database file and fsyncing it, which made every hundredth or so
    C-STORE wait for it). The other processes' commits still do, and the janitor runs a
    passive one at every sweep (``checkpoint_wal``), so the log stays bounded with
    ``--workers 0`` too.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(
            engine, foreign_keys=foreign_keys, durable=durable, checkpoints=checkpoints
        )
        return engine
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(parsed, **kwargs)
        _configure_postgresql(engine)
        return engine
    return create_engine(parsed, **kwargs)


def sync_wal(engine: Engine) -> None:
    """Make every commit so far durable, ``synchronous=NORMAL`` ones included: fsync the
    SQLite write-ahead log (the frames of all commits not yet checkpointed; checkpointed
    ones are in the database file, which a checkpoint fsyncs). Nothing to do elsewhere:
    PostgreSQL commits are durable when they return."""
    if engine.url.get_backend_name() != "sqlite" or not engine.url.database:
        return
    try:
        fd = os.open(f"{engine.url.database}-wal", os.O_RDONLY)
    except FileNotFoundError:
        return  # no log: every commit is in the database file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_wal(engine: Engine) -> None:
    """A passive SQLite checkpoint (it waits for no reader or writer): what the
    listener's commits no longer do themselves (make_engine ``checkpoints``)."""
    if engine.url.get_backend_name() != "sqlite":
        return
    with engine.connect() as connection:
        # On the driver's connection: outside any transaction, which a checkpoint needs.
        connection.connection.dbapi_connection.execute(  # type: ignore[union-attr]
            "PRAGMA wal_checkpoint(PASSIVE)"
        ).fetchall()


def make_session_factory(engine: Engine, *, write: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``write=True`` ones take SQLite's write lock at BEGIN.

    ``expire_on_commit=False``: the repository turns rows into frozen values after the
    commit, and must not reload every attribute to do it.
    """
    bind = engine.execution_options(**{WRITE_OPTION: True}) if write else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def _configure_sqlite(
    engine: Engine, *, foreign_keys: bool, durable: bool, checkpoints: bool
) -> None:
    pragmas = sqlite_pragmas(foreign_keys=foreign_keys, durable=durable, checkpoints=checkpoints)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # No implicit BEGIN from the driver: SQLAlchemy's begin event below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION, False):
            _begin_immediate(conn.connection.dbapi_connection)
        else:
            conn.exec_driver_sql("BEGIN")


def _begin_immediate(dbapi_connection: Any) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15... ms between tries; the node's
    writers (listener group commits, leases, worker results) each hold the lock for well
    under a millisecond, so those sleeps cost more than the commits they wait for. Here
    the wait is polled every 0.1-2 ms, up to the same total busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.0001
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    # As SQLAlchemy would have raised it: callers handle its errors only.
                    raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
            time.sleep(pause)
            pause = min(pause * 1.5, 0.002)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # The default, made explicit: a commit returns once it is durable (DESIGN §3.1).
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET synchronous_commit TO on")
            # A worker host that vanishes mid-transaction must not hold its row locks
            # until TCP gives up (hours): the server ends such a session, and notices a
            # dead peer within about half a minute (the jobs' SKIP LOCKED lease would
            # skip the locked job meanwhile, and it would stay leased).
            cursor.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
            # Every lock of ours is held for milliseconds (leases skip locked rows); one
            # held longer is another session's (an operator's psql, a stuck host).
            cursor.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            cursor.execute("SET tcp_keepalives_idle = 10")
            cursor.execute("SET tcp_keepalives_interval = 5")
            cursor.execute("SET tcp_keepalives_count = 3")
            cursor.execute("SET tcp_user_timeout = 30000")
        finally:
            cursor.close()
            dbapi_connection.autocommit = autocommit
