"""Job leasing and attempt recording (router/db/jobs.py) on SQLite, time injected."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from router.db.engine import make_engine, sqlite_url_for
from router.db.jobs import JobQueue
from router.db.migrate import upgrade
from router.db.models import JobState
from router.db.repository import NewInstance, Repository

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = sqlite_url_for(tmp_path)
    upgrade(url)
    return url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> Repository:
    repo = Repository(engine, clock=clock)
    repo.add_destination("pacs", "PACS", "10.0.0.5", 104)
    repo.add_destination("ai", "AI", "10.0.0.6", 105)
    return repo


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> JobQueue:
    return JobQueue(engine, clock=clock, max_deliveries=3)


def add(repo: Repository, n: int, *destinations: str, priority: int = 0) -> list[int]:
    result = repo.record_instances(
        [
            NewInstance(
                sop_instance_uid=f"1.2.3.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1",
                study_instance_uid="1.2.3",
                calling_aet="CT1",
                called_aet="ROUTER",
                peer_address="10.0.0.9",
                spool_name=f"{n:02x}/{n:032x}.dcm",
                size=100,
                digest=f"{n:064x}",
                destinations=destinations,
                unrouted=not destinations,
                priority=priority,
            )
        ]
    )
    return list(result[0].job_ids)


def test_lease_returns_what_a_worker_needs(repo: Repository, queue: JobQueue) -> None:
    (job,) = add(repo, 1, "pacs")
    (lease,) = queue.lease("w1", None, 10, 30)
    assert (lease.job_id, lease.destination, lease.host, lease.port) == (
        job,
        "pacs",
        "10.0.0.5",
        104,
    )
    assert lease.spool_name == f"{1:02x}/{1:032x}.dcm"
    assert lease.deliveries == 1 and lease.attempts == 0
    assert lease.expires_at == NOW + dt.timedelta(seconds=30)
    assert queue.lease("w2", None, 10, 30) == []  # leased jobs are not handed out twice


def test_priority_high_then_medium_then_low_then_oldest(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    low = add(repo, 1, "pacs", priority=2)[0]
    clock.advance(1)
    medium = add(repo, 2, "pacs", priority=0)[0]
    clock.advance(1)
    high = add(repo, 3, "pacs", priority=1)[0]
    clock.advance(1)
    medium2 = add(repo, 4, "pacs", priority=0)[0]
    order = [lease.job_id for lease in queue.lease("w", None, 10, 30)]
    assert order == [high, medium, medium2, low]


def test_destination_filter(repo: Repository, queue: JobQueue) -> None:
    pacs, ai = add(repo, 1, "pacs", "ai")
    assert [lease.job_id for lease in queue.lease("w", ["ai"], 10, 30)] == [ai]
    assert [lease.job_id for lease in queue.lease("w", ["pacs"], 10, 30)] == [pacs]


def test_finish_done_records_the_attempt_and_completes_the_instance(
    repo: Repository, queue: JobQueue
) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.finish(
        lease, JobState.DONE, outcome="done", started_at=NOW, duration_ms=12, dimse_status=0
    )
    job = queue.get_job(lease.job_id)
    assert job is not None and job.state == "done" and job.attempts == 1
    assert [(a.outcome, a.dimse_status, a.duration_ms) for a in job.history] == [("done", 0, 12)]
    assert repo.instance_counts() == {"done": 1}


def test_retry_wait_is_due_again_only_at_its_time(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    later = NOW + dt.timedelta(seconds=60)
    assert queue.finish(
        lease,
        JobState.RETRY_WAIT,
        outcome="retry",
        started_at=NOW,
        duration_ms=5,
        dimse_status=0xA700,
        next_attempt_at=later,
    )
    assert queue.lease("w", None, 10, 30) == []
    clock.advance(61)
    (again,) = queue.lease("w", None, 10, 30)
    assert again.attempts == 1 and again.deliveries == 2


def test_stale_lease_writes_nothing(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    add(repo, 1, "pacs")
    (first,) = queue.lease("w1", None, 10, 30)
    clock.advance(31)  # expired: the job goes to another worker
    (second,) = queue.lease("w2", None, 10, 30)
    assert second.deliveries == 2
    assert not queue.finish(first, JobState.DONE, outcome="done", started_at=NOW, duration_ms=1)
    job = queue.get_job(first.job_id)
    assert job is not None and job.state == "leased" and job.history == ()
    assert queue.finish(second, JobState.DONE, outcome="done", started_at=NOW, duration_ms=1)


def test_deliveries_cap_dead_letters_a_job_that_crashes_workers(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (job_id,) = add(repo, 1, "pacs")
    for _ in range(3):  # each lease expires: the worker died mid-send
        assert len(queue.lease("w", None, 10, 30)) == 1
        clock.advance(31)
    assert queue.lease("w", None, 10, 30) == []
    job = queue.get_job(job_id)
    assert job is not None and job.state == "dead"
    assert job.last_error == "worker crashed 3 times"


def test_release_gives_leases_back_without_counting(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs", "ai")
    assert len(queue.lease("w1", None, 10, 30)) == 2
    assert queue.release("w1") == 2
    leases = queue.lease("w2", None, 10, 30)
    assert [lease.deliveries for lease in leases] == [1, 1]


def test_extend_keeps_a_lease_alive(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    clock.advance(25)
    assert queue.extend(lease, 30)
    clock.advance(25)
    assert queue.lease("w2", None, 10, 30) == []


def test_retry_dead_by_job_and_by_destination(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs", "ai")
    for lease in queue.lease("w", None, 10, 30):
        queue.finish(
            lease, JobState.DEAD, outcome="dead", started_at=NOW, duration_ms=1, dimse_status=0xC000
        )
    assert queue.retry_dead(destination="ai") == 1
    assert [lease.destination for lease in queue.lease("w", None, 10, 30)] == ["ai"]
    assert queue.retry_dead() == 1
    (lease,) = queue.lease("w", None, 10, 30)
    assert lease.destination == "pacs" and lease.attempts == 0


def _leaser(url: str, owner: str, out: Any, start: Any) -> None:
    engine = make_engine(url)
    queue = JobQueue(engine)
    start.wait(30)
    got = []
    while batch := queue.lease(owner, None, 5, 300):
        got.extend(lease.job_id for lease in batch)
    out.put(got)
    engine.dispose()


def test_two_processes_never_lease_the_same_job(url: str, repo: Repository) -> None:
    for n in range(200):
        add(repo, n, "pacs")
    context = multiprocessing.get_context("fork")
    out, start = context.Queue(), context.Event()
    workers = [context.Process(target=_leaser, args=(url, f"w{i}", out, start)) for i in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    results = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert not set(results[0]) & set(results[1])
    assert sorted(results[0] + results[1]) == list(range(1, 201))
