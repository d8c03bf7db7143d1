"""End-to-end fixtures: real ``dicom-router`` processes (DESIGN §8).

The ``router_node`` fixture (``NodeUnderTest`` below), used by test_ingest.py and
test_ingest_durability.py: one node is a data directory configured through the CLI
(``init``, ``destinations add``, ``rules add``) and ``dicom-router serve`` as a
subprocess in its own process group on a port chosen at run time, with a CLI runner and
database/spool queries. Running the CLI costs about a second per command, so that
configured data directory is made once per session (through the CLI) and copied for each
node before its ``serve``. Plain helpers for those tests are in ``ingest_support.py``.

The database: SQLite in the data directory, unless the test asks for the ``db_backend``
fixture (tests/conftest.py; ``@pytest.mark.usefixtures("db_backend")``, as the e2e
modules' ``ON_BOTH_DATABASES``): then it runs once on SQLite and once on PostgreSQL,
each node on a database of its own (``DICOM_ROUTER_DB``) copied from one configured
through the CLI once per session. ``NodeUnderTest.query`` reads either through
SQLAlchemy.

Every wait is bounded; every process group is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from db_support import PostgresServer, db_query
from ingest_support import (
    DESTINATIONS,
    HOST,
    RULES,
    SPOOL_NAME,
    SUCCESS,
    free_port,
    mount_tmpfs,
    open_association,
    unmount,
)

# --------------------------------------------------------------------------------------
# router_node: NodeUnderTest
# --------------------------------------------------------------------------------------
SERVE_START_TIMEOUT = 90.0  # generous: every process of serve starts under load
CLI_TIMEOUT = 60.0


def dicom_router_argv(*args: str) -> list[str]:
    """The installed console script beside this interpreter (what an operator runs)."""
    script = Path(sys.executable).parent / "dicom-router"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from router.cli import main; main()", *args]


def _clean_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ROUTER_")}
    env.update(extra or {})
    return env


class NodeUnderTest:
    """One router node: data directory, CLI runner, ``serve`` process, state queries."""

    def __init__(
        self, root: Path, env: Mapping[str, str] | None = None, db_url: str | None = None
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        # serve's working directory, deep inside root, so that a relative path escaping
        # it ("../../x") still lands where the tests look.
        self.cwd = root / "cwd" / "a" / "b"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "serve.log"
        self.env = _clean_environment(env)
        if db_url is not None:  # PostgreSQL; None: SQLite in the data directory
            self.env["DICOM_ROUTER_DB"] = db_url
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        """The SQLite file (used only where SQLite itself is what a test is about)."""
        return self.data_dir / "router.sqlite"

    @property
    def db_url(self) -> str:
        return self.env.get("DICOM_ROUTER_DB") or f"sqlite:///{self.db_path.resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def store_dir(self) -> Path:
        return self.spool_dir / "store"

    @property
    def tmp_dir(self) -> Path:
        return self.spool_dir / "tmp"

    # -- the CLI -----------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``dicom-router --data-dir DATA ARGS...`` to completion, in its own group."""
        argv = dicom_router_argv("--data-dir", str(self.data_dir), *args)
        proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise AssertionError(f"dicom-router {' '.join(args)} ran over {timeout} s") from None
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"dicom-router {' '.join(args)} exited {result.returncode}:\n{stderr}{stdout}"
            )
        return result

    def configure(self) -> None:
        """init, the destinations and the rules of ``ingest_support`` (nothing listens at
        the destinations: this suite checks ingest, jobs stay pending)."""
        self.cli("init")
        for name in DESTINATIONS:
            self.cli(
                "destinations",
                "add",
                name,
                "--aet",
                name.upper(),
                "--host",
                HOST,
                "--port",
                str(free_port()),
            )
        for rule in RULES:
            self.cli("rules", "add", *rule)

    # -- serve -------------------------------------------------------------------------
    def start(self, timeout: float = SERVE_START_TIMEOUT) -> None:
        """Start ``serve`` and return once it answers a C-ECHO (retries a port lost to
        another process between choosing and binding it)."""
        assert not self.running, "serve is already running"
        for _ in range(3):
            port = self.port or free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    dicom_router_argv(
                        "-v",
                        "--data-dir",
                        str(self.data_dir),
                        "serve",
                        "--port",
                        str(port),
                        "--bind",
                        HOST,
                        "--workers",
                        "0",  # ingest only: the jobs must stay pending
                    ),
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self.port = port
            if self._wait_ready(offset, timeout):
                return
            text = self.log()[offset:]
            self.kill()
            if "Address already in use" not in text and "Errno 98" not in text:
                raise AssertionError(f"serve did not become ready within {timeout} s:\n{text}")
            self.port = 0
        raise AssertionError(f"serve could not bind a port:\n{self.log()}")

    def _wait_ready(self, offset: int, timeout: float) -> bool:
        assert self.proc is not None
        marker = f"listening on {HOST}:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if marker in self.log()[offset:] and asyncio.run(self._echo()) == SUCCESS:
                return True
            time.sleep(0.05)
        return False

    async def _echo(self) -> int | None:
        try:
            async with open_association(self.port, dimse_timeout=5) as assoc:
                return await assoc.send_c_echo()
        except Exception:  # not up yet (refused, reset, rejected, timed out)
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to serve's process group now (no wait)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL serve's whole process group and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful); SIGKILL if it does not exit in time. Returns the status."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- state -------------------------------------------------------------------------
    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Rows of ``sql`` (``?`` parameters) on the node's database, either backend."""
        names = iter(range(len(params)))
        named = re.sub(r"\?", lambda _: f":p{next(names)}", sql)
        return db_query(self.db_url, named, **{f"p{i}": v for i, v in enumerate(params)})

    def instances(self) -> list[dict[str, object]]:
        """Every instance row with the names of its jobs' destinations (sorted)."""
        rows = self.query(
            "select i.id, i.sop_instance_uid, i.state, i.spool_name, i.size, i.calling_aet,"
            " i.transfer_syntax, d.name, j.state"
            " from instances i left join jobs j on j.instance_id = i.id"
            " left join destinations d on d.id = j.destination_id order by i.id, d.name"
        )
        out: dict[object, dict[str, object]] = {}
        for iid, uid, state, name, size, aet, ts, dest, job_state in rows:
            row = out.setdefault(
                iid,
                {
                    "id": iid,
                    "sop_instance_uid": uid,
                    "state": state,
                    "spool_name": name,
                    "size": size,
                    "calling_aet": aet,
                    "transfer_syntax": ts,
                    "destinations": [],
                    "job_states": [],
                },
            )
            if dest is not None:
                row["destinations"].append(dest)  # type: ignore[attr-defined]
                row["job_states"].append(job_state)  # type: ignore[attr-defined]
        return list(out.values())

    def by_uid(self) -> dict[str, list[dict[str, object]]]:
        out: dict[str, list[dict[str, object]]] = {}
        for row in self.instances():
            out.setdefault(str(row["sop_instance_uid"]), []).append(row)
        return out

    def store_files(self) -> set[str]:
        """Every entry under spool/store/<xx>/ as "xx/name" (whatever its name)."""
        if not self.store_dir.exists():
            return set()
        return {
            f"{sub.name}/{entry.name}"
            for sub in self.store_dir.iterdir()
            if sub.is_dir()
            for entry in sub.iterdir()
        }

    def tmp_files(self) -> list[str]:
        return sorted(p.name for p in self.tmp_dir.iterdir()) if self.tmp_dir.exists() else []

    def assert_spool_matches_database(self) -> None:
        """spool/tmp is empty; every store file has a router-generated name and a row;
        every row has its file (no orphan file, no row without a file)."""
        assert self.tmp_files() == [], f"half-written files left: {self.tmp_files()}"
        files = self.store_files()
        bad = sorted(name for name in files if not SPOOL_NAME.match(name))
        assert not bad, f"spool names not made by the router: {bad}"
        names = {str(name) for (name,) in self.query("select spool_name from instances")}
        assert files - names == set(), f"files without a row: {sorted(files - names)}"
        assert names - files == set(), f"rows without a file: {sorted(names - files)}"
        stray = {p.name for p in self.store_dir.iterdir()} - {f"{i:02x}" for i in range(256)}
        assert not stray, f"unexpected entries in spool/store: {stray}"


class NodeFactory:
    """``router_node(env=...)``: a configured node (not started) under tmp_path."""

    def __init__(
        self, tmp_path: Path, template: Path, database: Callable[[], str] | None = None
    ) -> None:
        self._tmp_path = tmp_path
        self._template = template
        self._database = database  # a new configured PostgreSQL database's URL, or SQLite
        self.nodes: list[NodeUnderTest] = []

    def __call__(self, env: Mapping[str, str] | None = None) -> NodeUnderTest:
        db_url = self._database() if self._database is not None else None
        node = NodeUnderTest(self._tmp_path / f"node{len(self.nodes)}", env, db_url)
        self.nodes.append(node)
        shutil.copytree(self._template, node.data_dir, symlinks=True)
        return node

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="session")
def configured_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory set up through the CLI: init, destinations add, rules add."""
    node = NodeUnderTest(tmp_path_factory.mktemp("template"))
    node.configure()
    listed = node.cli("rules", "list", "--json").stdout
    assert all(rule[0] in listed for rule in RULES), listed
    return node.data_dir


#: The PostgreSQL database configured once per session (the nodes' template).
CONFIGURED_PG = "router_e2e_configured"


@pytest.fixture(scope="session")
def configured_pg_data_dir(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> Path:
    """``configured_data_dir`` with its database on PostgreSQL (``CONFIGURED_PG``)."""
    postgres_server.admin(f"CREATE DATABASE {CONFIGURED_PG}")
    node = NodeUnderTest(
        tmp_path_factory.mktemp("template-pg"), db_url=postgres_server.url(CONFIGURED_PG)
    )
    node.configure()  # every CLI process has exited: nobody is left on the template
    return node.data_dir


@pytest.fixture
def router_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeFactory]:
    database: Callable[[], str] | None = None
    if "db_backend" in request.fixturenames and request.getfixturevalue("db_backend") != "sqlite":
        template = request.getfixturevalue("configured_pg_data_dir")
        server: PostgresServer = request.getfixturevalue("postgres_server")
        made: list[str] = []

        def database() -> str:
            made.append(server.create_database(template=CONFIGURED_PG))
            return server.url(made[-1])

        request.addfinalizer(lambda: [server.drop_database(name) for name in made])
    else:
        template = request.getfixturevalue("configured_data_dir")
    factory = NodeFactory(tmp_path, template, database)
    try:
        yield factory
    finally:
        factory.kill_all()


@pytest.fixture
def tmpfs(router_node: NodeFactory) -> Iterator[Callable[[Path, str], Path]]:
    """``tmpfs(path, "2m")`` mounts a small tmpfs; at teardown every node is killed first
    (an open file keeps a mount busy), then everything mounted here is unmounted."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        router_node.kill_all()
        for path in reversed(mounted):
            unmount(path)
