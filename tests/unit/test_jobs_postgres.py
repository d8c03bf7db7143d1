"""JobQueue on a real PostgreSQL (DESIGN §8): the migrations, leasing with SELECT … FOR
UPDATE SKIP LOCKED from two processes, and instances completed by two processes at once.

The server is started here: initdb and postgres refuse to run as root, so they run as
the ``postgres`` user (``runuser``) in a directory that user owns, with ``-k`` for the
socket directory and a free port. Without the binaries the module is skipped, except
with ``CI`` set, where that is a failure.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from router.db.engine import make_engine
from router.db.jobs import JobQueue, Lease, Result
from router.db.migrate import current_revision, head_revision, upgrade
from router.db.models import JobState
from router.db.repository import Repository
from tests.unit.test_jobs import NOW, Clock, add, lease_in_two_processes, spool

PG_BIN = Path(os.environ.get("DICOM_ROUTER_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _missing() -> str | None:
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A throw-away PostgreSQL server; yields the URL of its ``router`` database."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    # Not pytest's tmp_path: the postgres user must own the directory and reach it.
    base = Path(tempfile.mkdtemp(prefix="dicom-router-pg-"))
    base.chmod(0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data, port = base / "data", _free_port()
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    process = subprocess.Popen(
        _as_postgres(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-k",
                str(base),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a test server: durability is not what is tested here
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        admin = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _wait_ready(admin, process)
        engine = make_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("CREATE DATABASE router"))
        engine.dispose()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/router"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    engine = make_engine(url)
    deadline = time.monotonic() + 30
    try:
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"postgres exited with {process.returncode}: {stderr[-2000:]}")
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        engine.dispose()


@pytest.fixture
def url(server: str) -> Iterator[str]:
    """The migrated database, emptied after each test."""
    upgrade(server)
    yield server
    engine = make_engine(server)
    with engine.begin() as connection:
        connection.execute(
            text("TRUNCATE attempts, jobs, instances, rule_destinations, rules, destinations")
        )
    engine.dispose()


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> Repository:
    repo = Repository(engine, clock=Clock())
    repo.add_destination("pacs", "PACS", "10.0.0.5", 104)
    repo.add_destination("ai", "AI", "10.0.0.6", 105)
    return repo


def test_migrations_reach_the_head(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()


def test_lease_and_results_on_postgresql(repo: Repository, engine: Engine) -> None:
    clock = Clock()
    queue = JobQueue(engine, clock=clock, max_deliveries=2)
    add(repo, 1, "pacs", "ai")
    (crashing,) = add(repo, 2, "pacs", priority=1)
    first = queue.lease("w", None, 10, 30)
    assert first[0].job_id == crashing  # HIGH first
    clock.advance(31)
    again = queue.lease("w2", ["pacs"], 10, 30)
    assert {lease.deliveries for lease in again} == {2}
    by_id = {lease.job_id: lease for lease in again}
    clock.advance(31)
    ai = queue.lease("w3", ["ai"], 10, 30)
    assert len(ai) == 1 and queue.complete(ai[0].job_id, ai[0].token, 0, False, NOW, 1)
    assert queue.lease("w4", None, 10, 30) == []  # both pacs jobs reached the cap
    job = queue.get_job(crashing)
    assert job is not None and job.state == "dead"
    assert job.last_error == "worker crashed 2 times (2 deliveries)"
    stale = by_id[crashing]
    assert not queue.complete(stale.job_id, stale.token, 0, False, NOW, 1)
    assert queue.retry_dead(destination="pacs") == 2
    for lease in queue.lease("w5", None, 10, 30):
        assert queue.complete(lease.job_id, lease.token, 0, False, NOW, 1)
    assert sorted(queue.removable_spool_files()) == [spool(1), spool(2)]
    summary = queue.status_summary(NOW + dt.timedelta(seconds=62))
    assert summary.count("done") == 3 and summary.attempts == 3


def test_two_processes_never_lease_the_same_job(url: str, repo: Repository) -> None:
    expected = [job for n in range(200) for job in add(repo, n, "pacs")]
    got = lease_in_two_processes(url, expected)
    assert all(got)  # SKIP LOCKED: both made progress


def _completer(url: str, leases: list[Lease], out: Any, start: Any) -> None:
    engine = make_engine(url)
    queue = JobQueue(engine)
    started = dt.datetime.now(dt.UTC)
    results = [Result(lease, JobState.DONE, "done", started, 1, 0) for lease in leases]
    start.wait(30)
    out.put([name for name in queue.finish_many(results) if name])  # one transaction
    engine.dispose()


def test_the_last_two_jobs_of_instances_finished_at_once(
    url: str, repo: Repository, engine: Engine
) -> None:
    """Two workers record, each in one transaction at the same moment, one of the two
    jobs of every instance: each instance is done, its spool file reported once. (Were
    the instance rows not locked, each transaction would see the other's jobs still
    leased, and no instance would be done.)"""
    for n in range(150):
        add(repo, n, "pacs", "ai")
    queue = JobQueue(engine)
    batches = [queue.lease(f"w-{name}", [name], 1000, 300) for name in ("pacs", "ai")]
    context = multiprocessing.get_context("fork")
    out, start = context.Queue(), context.Event()
    workers = [
        context.Process(target=_completer, args=(url, batch, out, start)) for batch in batches
    ]
    for worker in workers:
        worker.start()
    start.set()
    reported = [name for _ in workers for name in out.get(timeout=120)]
    for worker in workers:
        worker.join(30)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert sorted(reported) == sorted(spool(n) for n in range(150))
    assert repo.instance_counts() == {"done": 150}
    assert len(queue.removable_spool_files(limit=1000)) == 150
