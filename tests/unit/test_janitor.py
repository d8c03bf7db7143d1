"""SpoolJanitor (router/janitor.py): files of done instances go, after the retention
period; files of instances with work left, dead-lettered or unrouted stay; a file the
worker already removed is only marked."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from db_support import new_instance
from sqlalchemy import Engine

from router.db.engine import make_engine
from router.db.jobs import JobQueue
from router.db.repository import Repository
from router.janitor import SpoolJanitor
from router.spool import Spool

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)  # SQLite and PostgreSQL (tests/conftest.py)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> Repository:
    repo = Repository(engine, clock=clock)
    repo.add_destination("pacs", "PACS", "10.0.0.5", 104)
    return repo


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> JobQueue:
    return JobQueue(engine, clock=clock)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create_layout()
    return spool


def receive(repo: Repository, spool: Spool, n: int, *destinations: str) -> str:
    temp = spool.create_temp()
    os.write(temp.fd, b"dataset")
    spool.commit(temp)
    repo.record_instances([new_instance(n, *destinations, spool_name=temp.spool_name, size=7)])
    return temp.spool_name


def forward(queue: JobQueue, *, dead: bool = False) -> None:
    for lease in queue.lease("w", None, 100, 60):
        if dead:
            queue.dead_letter(lease.job_id, lease.token, "refused", 0xC000, NOW, 5)
        else:
            queue.complete(lease.job_id, lease.token, 0, False, NOW, 5)


def test_done_files_go_and_others_stay(repo: Repository, queue: JobQueue, spool: Spool) -> None:
    done = receive(repo, spool, 1, "pacs")
    forward(queue)
    pending = receive(repo, spool, 2, "pacs")
    unrouted = receive(repo, spool, 3)
    janitor = SpoolJanitor(queue, spool)
    assert janitor.sweep() == 1
    assert not spool.path_for(done).exists()
    assert spool.path_for(pending).exists() and spool.path_for(unrouted).exists()
    assert queue.removable_spool_files() == []
    assert janitor.sweep() == 0


def test_dead_lettered_files_stay_for_a_retry(
    repo: Repository, queue: JobQueue, spool: Spool
) -> None:
    name = receive(repo, spool, 1, "pacs")
    forward(queue, dead=True)
    assert SpoolJanitor(queue, spool).sweep() == 0
    assert spool.path_for(name).exists()


def test_retention_keeps_files_for_a_while(
    repo: Repository, queue: JobQueue, spool: Spool, clock: Clock
) -> None:
    name = receive(repo, spool, 1, "pacs")
    forward(queue)
    janitor = SpoolJanitor(queue, spool, retention=dt.timedelta(hours=1))
    clock.now = NOW + dt.timedelta(minutes=59)
    assert janitor.sweep() == 0 and spool.path_for(name).exists()
    clock.now = NOW + dt.timedelta(hours=1, seconds=1)
    assert janitor.sweep() == 1 and not spool.path_for(name).exists()


def test_a_file_already_gone_is_only_marked(
    repo: Repository, queue: JobQueue, spool: Spool
) -> None:
    name = receive(repo, spool, 1, "pacs")
    forward(queue)
    spool.remove(name)  # a worker removed it, or the janitor crashed before marking
    assert SpoolJanitor(queue, spool).sweep() == 1
    assert queue.removable_spool_files() == []


def test_sweeps_in_batches_until_nothing_is_left(
    repo: Repository, queue: JobQueue, spool: Spool
) -> None:
    names = [receive(repo, spool, n, "pacs") for n in range(7)]
    forward(queue)
    assert SpoolJanitor(queue, spool, batch=3).sweep() == 7
    assert not any(spool.path_for(name).exists() for name in names)


class SyncWatchingQueue(JobQueue):
    """A JobQueue that notes, at each ``sync``, which spool files still exist."""

    def __init__(self, engine: Engine, clock: Clock, spool: Spool, names: list[str]) -> None:
        super().__init__(engine, clock=clock)
        self.present_at_sync: list[bool] = []
        self._spool, self._names = spool, names

    def sync(self) -> None:
        super().sync()
        self.present_at_sync.append(all(self._spool.path_for(n).exists() for n in self._names))


def test_results_are_made_durable_before_a_file_goes(
    engine: Engine, repo: Repository, clock: Clock, spool: Spool
) -> None:
    # Workers commit results with synchronous=NORMAL; the janitor fsyncs the log first.
    names = [receive(repo, spool, n, "pacs") for n in (1, 2)]
    queue = SyncWatchingQueue(engine, clock, spool, names)
    forward(queue)
    janitor = SpoolJanitor(queue, spool)
    assert janitor.sweep() == 2
    assert queue.present_at_sync == [True]
    assert not any(spool.path_for(n).exists() for n in names)


def test_nothing_removable_needs_no_sync(
    engine: Engine, repo: Repository, clock: Clock, spool: Spool
) -> None:
    names = [receive(repo, spool, 1, "pacs")]  # its job is still to do
    queue = SyncWatchingQueue(engine, clock, spool, names)
    assert SpoolJanitor(queue, spool).sweep() == 0
    assert queue.present_at_sync == []


def test_every_sweep_ends_with_a_checkpoint(
    repo: Repository, queue: JobQueue, spool: Spool
) -> None:
    """The listener's commits leave SQLite's WAL checkpoints to others (make_engine
    ``checkpoints=False``): the janitor runs one per sweep, with work or without."""
    calls: list[int] = []
    janitor = SpoolJanitor(queue, spool, checkpoint=lambda: calls.append(1))
    assert janitor.sweep() == 0
    receive(repo, spool, 1, "pacs")
    forward(queue)
    assert janitor.sweep() == 1
    assert calls == [1, 1]
