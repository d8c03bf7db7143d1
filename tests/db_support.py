"""The test databases (DESIGN §8): a throw-away PostgreSQL server, fresh databases on it,
and reading either backend (SQLite or PostgreSQL) through SQLAlchemy.

The server: ``initdb`` and ``postgres`` refuse to run as root, so as root they run as the
``postgres`` user (``runuser``) in a directory that user owns under /tmp (pytest's
``tmp_path`` is not reachable by it), with ``-k`` for the socket directory and a port
chosen at run time. A database per test is ``CREATE DATABASE … TEMPLATE`` of one migrated
once (a file copy: tens of milliseconds, where running the migrations takes a second).
Without the binaries PostgreSQL tests are skipped, except with ``CI`` set, where that is
a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

PG_BIN = Path(os.environ.get("DICOM_ROUTER_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: The migrated database every ``fresh`` migrated database is copied from.
TEMPLATE = "router_template"


def postgres_problem() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "postgres").exists():
        return f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install '.[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user to run the server as"
        if shutil.which("runuser") is None:
            return "runuser not found"
    return None


def require_postgres() -> None:
    """Skip the calling test without PostgreSQL; under ``CI`` fail instead (DESIGN §8)."""
    reason = postgres_problem()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def as_postgres(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the postgres user when we are root (initdb and postgres refuse root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


def postgres_owned_dir(prefix: str) -> Path:
    """A new directory under the system temp dir that the postgres user owns."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(base, entry.pw_uid, entry.pw_gid)
    return base


def initdb_argv(data: Path) -> list[str]:
    return as_postgres(
        [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One ``postgres`` on 127.0.0.1 and a free port, its data under a temp directory."""

    def __init__(self) -> None:
        self.base = postgres_owned_dir("dicom-router-pg-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        data = self.base / "data"
        subprocess.run(initdb_argv(data), check=True, capture_output=True, timeout=120)
        self.port = free_port()
        log = open(self.base / "postgres.log", "ab")  # noqa: SIM115 (the server's lifetime)
        with log:
            self.process = subprocess.Popen(
                as_postgres(
                    [
                        str(PG_BIN / "postgres"),
                        "-D",
                        str(data),
                        "-k",
                        str(self.base),
                        "-p",
                        str(self.port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        # A test server: durability is not what is tested here (the node
                        # itself still asks for synchronous_commit=on).
                        "-c",
                        "fsync=off",
                        "-c",
                        "full_page_writes=off",
                        # Every e2e node is several processes, each with a small pool.
                        "-c",
                        "max_connections=300",
                        "-c",
                        "timezone=UTC",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import psycopg

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}: {self.log()}")
            try:
                psycopg.connect(self._dsn("postgres"), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        path = self.base / "postgres.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def admin(self, *statements: str) -> None:
        """Run statements outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(self._dsn("postgres"), autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)  # type: ignore[arg-type]

    def create_database(self, *, template: str | None = None) -> str:
        """A new database (a copy of ``template`` if given); its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        source = f" TEMPLATE {template}" if template else ""
        self.admin(f"CREATE DATABASE {name}{source}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server with the migrated ``TEMPLATE`` database, stopped at the end."""
    from router.db.migrate import upgrade

    require_postgres()
    server = PostgresServer()
    try:
        server.start()
        server.admin(f"CREATE DATABASE {TEMPLATE}")
        upgrade(server.url(TEMPLATE))  # NullPool: no session left on the template
        yield server
    finally:
        server.stop()


def db_query(url: str, sql: str, /, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (SQLAlchemy ``text``: ``:name`` parameters) on either backend."""
    from sqlalchemy.pool import NullPool

    from router.db.engine import make_engine

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


def requested_pg_url(request: pytest.FixtureRequest) -> str | None:
    """For a fixture of a test that asked for ``db_backend`` (tests/conftest.py) and runs
    on PostgreSQL: the URL of a new migrated database of its own; otherwise None (the
    node's SQLite default)."""
    if "db_backend" not in request.fixturenames:
        return None
    if request.getfixturevalue("db_backend") == "sqlite":
        return None
    return str(request.getfixturevalue("pg_database")())


def new_instance(
    n: int,
    *destinations: str,
    spool_name: str | None = None,
    size: int = 100,
    priority: int = 0,
) -> Any:
    """A NewInstance for repository and queue tests: UID 1.2.3.<n> of a CT study
    1.2.3 from CT1, its spool name and digest made from ``n``; unrouted without
    destinations."""
    from router.db.repository import NewInstance

    return NewInstance(
        sop_instance_uid=f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_instance_uid="1.2.3",
        calling_aet="CT1",
        called_aet="ROUTER",
        peer_address="10.0.0.9",
        spool_name=spool_name or f"{n % 256:02x}/{n:032x}.dcm",
        size=size,
        digest=f"{n:064x}",
        destinations=destinations,
        unrouted=not destinations,
        priority=priority,
    )
