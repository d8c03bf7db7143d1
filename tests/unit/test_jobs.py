"""JobQueue (router/db/jobs.py) on a migrated database (SQLite and PostgreSQL), time
injected through the clock: every state transition, ordering, leases and their tokens,
the caps, spool clean-up, the operators' commands, queue status figures, and two leasing
processes (and two finishing at once)."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest
from db_support import new_instance
from sqlalchemy import Engine, text

from router.db.engine import make_engine
from router.db.jobs import (
    MAX_DELIVERIES,
    OUTCOME_DEAD,
    OUTCOME_DONE,
    OUTCOME_RETRY,
    OUTCOME_WARNING,
    JobQueue,
    Lease,
    Result,
)
from router.db.migrate import upgrade
from router.db.models import JobState
from router.db.repository import Repository

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
HIGH, MEDIUM, LOW = 1, 0, 2


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def url(db_url: str) -> str:
    """A migrated database of its own: SQLite and PostgreSQL (tests/conftest.py)."""
    return db_url


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
    repo.add_destination("ai", "AI", "10.0.0.6", 105, max_associations=4, max_retries=3)
    return repo


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> JobQueue:
    return JobQueue(engine, clock=clock, max_deliveries=3)


def spool(n: int) -> str:
    return f"{n:02x}/{n:032x}.dcm"


def add(repo: Repository, n: int, *destinations: str, priority: int = MEDIUM) -> list[int]:
    result = repo.record_instances(
        [new_instance(n, *destinations, spool_name=spool(n), priority=priority)]
    )
    return list(result[0].job_ids)


def ids(leases: list[Lease]) -> list[int]:
    return [lease.job_id for lease in leases]


def snapshot(engine: Engine) -> tuple[Any, ...]:
    """Everything a result could have written."""
    with engine.connect() as connection:
        jobs = connection.execute(text("SELECT * FROM jobs ORDER BY id")).all()
        attempts = connection.execute(text("SELECT * FROM attempts ORDER BY id")).all()
        instances = connection.execute(text("SELECT * FROM instances ORDER BY id")).all()
    return tuple(jobs), tuple(attempts), tuple(instances)


def complete(queue: JobQueue, lease: Lease, warning: bool = False) -> bool:
    return queue.complete(lease.job_id, lease.token, 0, warning, NOW, 10)


def dead_letter(queue: JobQueue, lease: Lease, reason: str = "status 0xC000") -> bool:
    return queue.dead_letter(lease.job_id, lease.token, reason, 0xC000, NOW, 3)


# -- leasing ------------------------------------------------------------------------------
def test_lease_returns_what_a_worker_needs(repo: Repository, queue: JobQueue) -> None:
    (job,) = add(repo, 1, "ai", priority=HIGH)
    (lease,) = queue.lease("w1", None, 10, 30)
    assert (lease.job_id, lease.destination, lease.ae_title, lease.host, lease.port) == (
        job,
        "ai",
        "AI",
        "10.0.0.6",
        105,
    )
    assert (lease.max_associations, lease.max_retries, lease.priority) == (4, 3, HIGH)
    assert lease.spool_name == spool(1)
    assert lease.transfer_syntax == "1.2.840.10008.1.2.1"
    assert lease.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert lease.sop_instance_uid == "1.2.3.1"
    assert lease.deliveries == 1 and lease.attempts == 0
    assert lease.expires_at == NOW + dt.timedelta(seconds=30)
    assert len(lease.token) == 32 and "w1" not in lease.token
    stored = queue.get_job(job)
    assert stored is not None and stored.state == "leased" and stored.deliveries == 1
    assert stored.lease_owner == "w1" and stored.lease_expires_at == lease.expires_at
    assert queue.lease("w2", None, 10, 30) == []  # leased jobs are not handed out twice


def test_a_lease_says_whether_its_destination_is_set_to_tls(
    repo: Repository, queue: JobQueue
) -> None:
    from router.db.repository import TlsOptions

    repo.add_destination("secure", "SECURE", "10.0.0.7", 2762, tls=TlsOptions(ca="/ca.pem"))
    add(repo, 1, "pacs", "secure")
    leases = queue.lease("w", None, 10, 30)
    assert {lease.destination: lease.tls for lease in leases} == {"pacs": False, "secure": True}


def test_every_lease_has_its_own_token(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    add(repo, 1, "pacs", "ai")
    first = queue.lease("w", None, 10, 30)
    clock.advance(31)
    again = queue.lease("w", None, 10, 30)
    tokens = {lease.token for lease in first + again}
    assert len(tokens) == 4


def test_priority_high_then_medium_then_low_then_oldest(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    low = add(repo, 1, "pacs", priority=LOW)[0]
    clock.advance(1)
    medium = add(repo, 2, "pacs", priority=MEDIUM)[0]
    clock.advance(1)
    high = add(repo, 3, "pacs", priority=HIGH)[0]
    clock.advance(1)
    medium2 = add(repo, 4, "pacs", priority=MEDIUM)[0]
    clock.advance(1)
    high2 = add(repo, 5, "pacs", priority=HIGH)[0]
    assert ids(queue.lease("w", None, 2, 30)) == [high, high2]
    assert ids(queue.lease("w", None, 10, 30)) == [medium, medium2, low]


def test_a_retry_takes_its_place_by_the_time_it_became_due(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (first,) = add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.retry_later(first, lease.token, NOW + dt.timedelta(seconds=10), None, "x", NOW, 1)
    clock.advance(20)
    (later,) = add(repo, 2, "pacs")  # created after the retry became due
    assert ids(queue.lease("w", None, 10, 30)) == [first, later]


def test_destination_filter_and_exclusion(repo: Repository, queue: JobQueue) -> None:
    pacs1, ai1 = add(repo, 1, "pacs", "ai")
    pacs2, ai2 = add(repo, 2, "pacs", "ai")
    assert queue.lease("w", [], 10, 30) == []  # a worker that reaches nothing
    assert ids(queue.lease("w", ["ai"], 1, 30)) == [ai1]
    assert ids(queue.lease("w", None, 10, 30, exclude_destinations=["pacs"])) == [ai2]
    assert ids(queue.lease("w", ["ai", "pacs"], 10, 30, exclude_destinations={"ai"})) == [
        pacs1,
        pacs2,
    ]


def test_limit_and_nothing_due(repo: Repository, queue: JobQueue) -> None:
    assert queue.lease("w", None, 10, 30) == []
    add(repo, 1, "pacs", "ai")
    assert queue.lease("w", None, 0, 30) == []
    assert len(queue.lease("w", None, 1, 30)) == 1
    assert len(queue.lease("w", None, 5, 30)) == 1


def test_expired_lease_is_leased_again_and_counted(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (job,) = add(repo, 1, "pacs")
    (first,) = queue.lease("w1", None, 10, 30)
    clock.advance(30)  # expired at exactly its expiry
    (second,) = queue.lease("w2", None, 10, 30)
    assert second.job_id == job and second.deliveries == 2 and second.attempts == 0
    assert second.token != first.token
    stored = queue.get_job(job)
    assert stored is not None and stored.lease_owner == "w2"


def test_a_lease_not_yet_taken_over_still_holds(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    clock.advance(60)  # expired, but no one leased the job since
    assert complete(queue, lease)


def test_deliveries_cap_dead_letters_a_job_that_crashes_workers(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (job_id,) = add(repo, 1, "pacs")
    for n in range(1, 4):  # each lease expires: the worker died mid-send
        (lease,) = queue.lease("w", None, 10, 30)
        assert lease.deliveries == n
        clock.advance(31)
    (other,) = add(repo, 2, "pacs")
    # The capped job is dead-lettered on the way and does not take the only place.
    assert ids(queue.lease("w", None, 1, 30)) == [other]
    job = queue.get_job(job_id)
    assert job is not None and job.state == "dead"
    assert job.last_error == "worker crashed 3 times (3 deliveries)"
    assert (job.deliveries, job.attempts, job.lease_owner, job.history) == (3, 0, None, ())


def test_deliveries_cap_counts_recorded_attempts_apart(
    repo: Repository, engine: Engine, clock: Clock
) -> None:
    queue = JobQueue(engine, clock=clock, max_deliveries=3)
    (job_id,) = add(repo, 1, "pacs")  # pacs allows 10 attempts
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.retry_later(job_id, lease.token, NOW, 0xA700, "busy", NOW, 1)
    clock.advance(1)
    queue.lease("w", None, 10, 30)  # this one crashes
    clock.advance(31)
    (lease,) = queue.lease("w", None, 10, 30)
    assert (lease.deliveries, lease.attempts) == (3, 1)
    assert queue.retry_later(job_id, lease.token, clock.now, 0xA700, "busy", NOW, 1)
    assert queue.lease("w", None, 10, 30) == []
    job = queue.get_job(job_id)
    assert job is not None and job.last_error == "worker crashed 1 times (3 deliveries)"


def _crash(queue: JobQueue, clock: Clock, n: int) -> list[Lease]:
    """Lease ``n`` jobs and let the leases expire, as when the worker holding them died."""
    leases = queue.lease("w", None, n, 30)
    clock.advance(31)
    return leases


def test_a_suspect_is_leased_like_the_others_by_default(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    jobs = [add(repo, n, "pacs")[0] for n in range(1, 4)]
    _crash(queue, clock, 3)
    leases = queue.lease("w", None, 10, 30)
    assert ids(leases) == jobs and all(lease.suspect for lease in leases)
    assert leases.suspects_skipped == 0


def test_alone_leases_the_first_suspect_by_itself(  # FI-08
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    crashed = [add(repo, n, "pacs")[0] for n in range(1, 3)]
    _crash(queue, clock, 2)
    add(repo, 3, "pacs")  # never delivered: not a suspect
    (lease,) = queue.lease("w", None, 10, 30, suspects="alone")
    assert lease.job_id == crashed[0] and lease.suspect and lease.deliveries == 2
    stored = queue.get_job(crashed[1])
    assert stored is not None and stored.state == "leased"  # still due: its lease expired


def test_alone_without_a_suspect_leases_normally_and_skip_passes_them_over(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (crashed,) = add(repo, 1, "pacs")
    _crash(queue, clock, 1)
    fresh = [add(repo, n, "pacs")[0] for n in range(2, 4)]
    skipped = queue.lease("w", None, 10, 30, suspects="skip")
    assert ids(skipped) == fresh and skipped.suspects_skipped == 1
    assert not any(lease.suspect for lease in skipped)
    (alone,) = queue.lease("w", None, 10, 30, suspects="alone")
    assert alone.job_id == crashed


def test_a_retried_suspect_is_still_a_suspect(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    """deliveries > attempts stays true after a later attempt is recorded: once a job
    was held by a worker that died, it goes alone for the rest of its life."""
    (job_id,) = add(repo, 1, "pacs")
    _crash(queue, clock, 1)
    (lease,) = queue.lease("w", None, 10, 30, suspects="alone")
    assert queue.retry_later(job_id, lease.token, clock.now, 0xA700, "busy", NOW, 1)
    add(repo, 2, "pacs")
    assert ids(queue.lease("w", None, 10, 30, suspects="skip")) != [job_id]
    (again,) = queue.lease("w", None, 10, 30, suspects="alone")
    assert (
        again.job_id == job_id
        and again.suspect
        and (again.deliveries, again.attempts)
        == (
            3,
            1,
        )
    )


def test_attempts_cap_lowered_meanwhile_dead_letters_at_lease(
    repo: Repository, queue: JobQueue, engine: Engine
) -> None:
    (job_id,) = add(repo, 1, "ai")  # ai allows 3 attempts
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.retry_later(job_id, lease.token, NOW, 0xA700, "busy", NOW, 1)
    with engine.begin() as connection:
        connection.execute(text("UPDATE destinations SET max_retries = 1 WHERE name = 'ai'"))
    assert queue.lease("w", None, 10, 30) == []
    job = queue.get_job(job_id)
    assert job is not None and job.state == "dead" and job.last_error == "gave up after 1 attempts"


def test_max_deliveries_default_and_validation(engine: Engine) -> None:
    assert JobQueue(engine).max_deliveries == MAX_DELIVERIES == 15
    with pytest.raises(ValueError):
        JobQueue(engine, max_deliveries=0)


# -- results under the lease --------------------------------------------------------------
def test_complete_records_the_attempt_and_completes_the_instance(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    clock.advance(2)
    assert queue.complete(lease.job_id, lease.token, 0x0000, False, NOW, 12)
    job = queue.get_job(lease.job_id)
    assert job is not None and job.state == "done" and job.attempts == 1
    assert (job.last_status, job.last_error, job.lease_owner, job.lease_expires_at) == (
        0,
        None,
        None,
        None,
    )
    assert [(a.outcome, a.dimse_status, a.duration_ms, a.started_at) for a in job.history] == [
        (OUTCOME_DONE, 0, 12, NOW)
    ]
    assert repo.instance_counts() == {"done": 1}
    assert queue.removable_spool_files() == [spool(1)]


def test_complete_with_a_warning(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.complete(lease.job_id, lease.token, 0xB000, True, NOW, 5)
    job = queue.get_job(lease.job_id)
    assert job is not None and job.state == "done" and job.last_status == 0xB000
    assert [a.outcome for a in job.history] == [OUTCOME_WARNING]


def test_the_instance_is_done_only_with_its_last_job(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs", "ai")
    pacs, ai = queue.lease("w", None, 10, 30)
    assert complete(queue, pacs)
    assert repo.instance_counts() == {"routed": 1}
    assert queue.removable_spool_files() == []
    assert complete(queue, ai)
    assert repo.instance_counts() == {"done": 1}
    assert queue.removable_spool_files() == [spool(1)]


def test_retry_later_is_due_again_only_at_its_time(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    (job_id,) = add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    later = NOW + dt.timedelta(seconds=60)
    assert queue.retry_later(job_id, lease.token, later, 0xA700, "out of resources", NOW, 5)
    job = queue.get_job(job_id)
    assert job is not None and job.state == "retry_wait" and job.next_attempt_at == later
    assert (job.last_status, job.last_error, job.attempts) == (0xA700, "out of resources", 1)
    assert [(a.outcome, a.error) for a in job.history] == [(OUTCOME_RETRY, "out of resources")]
    assert queue.lease("w", None, 10, 30) == []
    clock.advance(59)
    assert queue.lease("w", None, 10, 30) == []
    clock.advance(1)
    (again,) = queue.lease("w", None, 10, 30)
    assert again.attempts == 1 and again.deliveries == 2
    assert repo.instance_counts() == {"routed": 1}


def test_retry_later_refuses_a_naive_time(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    with pytest.raises(ValueError, match="naive"):
        queue.retry_later(lease.job_id, lease.token, dt.datetime(2026, 5, 1), None, "x", NOW, 1)


def test_dead_letter_keeps_the_spool_file(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs", "ai")
    pacs, ai = queue.lease("w", None, 10, 30)
    assert dead_letter(queue, pacs, "SOP class not supported")
    assert complete(queue, ai)
    job = queue.get_job(pacs.job_id)
    assert job is not None and job.state == "dead" and job.attempts == 1
    assert (job.last_status, job.last_error) == (0xC000, "SOP class not supported")
    assert [a.outcome for a in job.history] == [OUTCOME_DEAD]
    assert repo.instance_counts() == {"routed": 1}  # not done: a retry may send it
    assert queue.removable_spool_files() == []


@pytest.mark.parametrize("result", ["complete", "retry_later", "dead_letter", "extend"])
def test_a_stale_token_writes_nothing(
    result: str, repo: Repository, queue: JobQueue, engine: Engine, clock: Clock
) -> None:
    add(repo, 1, "pacs")
    (first,) = queue.lease("w1", None, 10, 30)
    clock.advance(31)  # expired: the job goes to another worker
    (second,) = queue.lease("w2", None, 10, 30)
    before = snapshot(engine)
    calls = {
        "complete": lambda lease: complete(queue, lease),
        "retry_later": lambda lease: queue.retry_later(
            lease.job_id, lease.token, clock.now, None, "x", NOW, 1
        ),
        "dead_letter": lambda lease: dead_letter(queue, lease),
        "extend": lambda lease: queue.extend(lease.job_id, lease.token, 30),
    }
    assert calls[result](first) is False
    assert calls[result](Lease(**{**_fields(second), "token": "0" * 32})) is False
    assert snapshot(engine) == before
    assert calls[result](second) is True


def _fields(lease: Lease) -> dict[str, Any]:
    return {name: getattr(lease, name) for name in Lease.__slots__}


def test_a_finished_job_takes_no_second_result(
    repo: Repository, queue: JobQueue, engine: Engine
) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    assert complete(queue, lease)
    before = snapshot(engine)
    assert not complete(queue, lease)
    assert not dead_letter(queue, lease)
    assert not queue.extend(lease.job_id, lease.token, 30)
    assert not queue.complete(999, lease.token, 0, False, NOW, 1)  # no such job
    assert snapshot(engine) == before


def test_finish_many_in_one_transaction(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    add(repo, 1, "pacs", "ai")
    add(repo, 2, "pacs")
    a_pacs, a_ai, b_pacs = queue.lease("w", None, 10, 30)
    stale = Lease(**{**_fields(b_pacs), "token": "f" * 32})

    def result(lease: Lease, state: JobState, **extra: Any) -> Result:
        return Result(lease, state, str(state), NOW, 1, **extra)

    names = queue.finish_many(
        [
            result(a_pacs, JobState.DONE, dimse_status=0),
            result(stale, JobState.DONE),
            result(a_ai, JobState.DONE, dimse_status=0),
            result(b_pacs, JobState.RETRY_WAIT, next_attempt_at=clock.now, error="busy"),
        ]
    )
    # The instance is complete with a_ai (its last job); the stale result wrote nothing.
    assert names == ["", None, spool(1), ""]
    job = queue.get_job(b_pacs.job_id)
    assert job is not None and job.state == "retry_wait" and len(job.history) == 1
    with pytest.raises(ValueError, match="cannot leave the job leased"):
        queue.finish_many([result(b_pacs, JobState.LEASED)])


def test_finish_keyword_form(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    assert queue.finish(lease, JobState.DEAD, outcome="dead", started_at=NOW, duration_ms=1)
    assert not queue.finish(lease, JobState.DEAD, outcome="dead", started_at=NOW, duration_ms=1)


# -- heartbeats and shutdown --------------------------------------------------------------
def test_extend_keeps_a_lease_alive(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    add(repo, 1, "pacs")
    (lease,) = queue.lease("w", None, 10, 30)
    clock.advance(25)
    assert queue.extend(lease.job_id, lease.token, 30)
    clock.advance(25)
    assert queue.lease("w2", None, 10, 30) == []
    clock.advance(5)  # 30 s after the heartbeat
    (again,) = queue.lease("w2", None, 10, 30)
    assert again.deliveries == 2


def test_release_gives_an_owners_leases_back_without_counting(
    repo: Repository, queue: JobQueue
) -> None:
    add(repo, 1, "pacs", "ai")
    add(repo, 2, "pacs")
    w1 = queue.lease("w1", None, 2, 30)
    (w10,) = queue.lease("w10", None, 2, 30)  # a name w1 is a prefix of
    assert queue.release("w1") == 2
    assert queue.release("w1") == 0
    again = queue.lease("w2", None, 10, 30)
    assert ids(again) == ids(w1)
    assert [lease.deliveries for lease in again] == [1, 1]
    assert not complete(queue, w1[0])  # the released lease no longer holds
    assert complete(queue, w10)


# -- operators ----------------------------------------------------------------------------
def test_retry_dead_by_job_by_destination_and_all(repo: Repository, queue: JobQueue) -> None:
    add(repo, 1, "pacs", "ai")
    add(repo, 2, "pacs")
    for lease in queue.lease("w", None, 10, 30):
        assert dead_letter(queue, lease)
    pacs1, ai1, pacs2 = (job.id for job in queue.list_jobs("dead"))
    assert queue.retry_dead(job_id=pacs2) == 1
    assert queue.retry_dead(job_id=pacs2) == 0  # no longer dead
    assert queue.retry_dead(destination="ai") == 1
    assert queue.retry_dead(destination="nowhere") == 0
    assert queue.retry_dead() == 1
    job = queue.get_job(pacs1)
    assert job is not None and job.state == "pending"
    assert (job.attempts, job.deliveries, job.last_status, job.last_error) == (0, 0, None, None)
    assert len(job.history) == 1  # the history stays
    leases = queue.lease("w", None, 10, 30)
    assert sorted(ids(leases)) == sorted([pacs1, ai1, pacs2])
    assert all(lease.attempts == 0 and lease.deliveries == 1 for lease in leases)
    for lease in leases:
        assert complete(queue, lease)
    assert sorted(queue.removable_spool_files()) == [spool(1), spool(2)]


def test_purge_done_and_dead(repo: Repository, queue: JobQueue, engine: Engine) -> None:
    add(repo, 1, "pacs", "ai")
    add(repo, 2, "pacs")
    add(repo, 3, "ai")
    leases = {
        (lease.destination, lease.spool_name): lease for lease in queue.lease("w", None, 9, 30)
    }
    assert complete(queue, leases["pacs", spool(1)])
    assert dead_letter(queue, leases["ai", spool(1)])
    assert dead_letter(queue, leases["pacs", spool(2)])
    assert complete(queue, leases["ai", spool(3)])
    with pytest.raises(ValueError):
        queue.purge("pending")
    assert queue.purge("done", "pacs") == 1
    assert queue.purge("dead", "ai") == 1
    # Instance 1 has nothing left to do: done, its file removable. Instance 2 still
    # has a dead job, instance 3 was done already.
    assert sorted(queue.removable_spool_files()) == [spool(1), spool(3)]
    assert queue.purge("dead") == 1
    assert sorted(queue.removable_spool_files()) == [spool(1), spool(2), spool(3)]
    assert queue.purge("done") == 1
    assert [job.state for job in queue.list_jobs()] == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM attempts")).scalar() == 0


def test_list_jobs_filters_and_order(repo: Repository, queue: JobQueue, clock: Clock) -> None:
    first = add(repo, 1, "pacs", "ai")
    clock.advance(3600)
    second = add(repo, 2, "pacs")
    clock.advance(60)
    assert [job.id for job in queue.list_jobs()] == first + second
    assert [job.id for job in queue.list_jobs(limit=2)] == first
    assert [job.id for job in queue.list_jobs(destination="pacs")] == [first[0], second[0]]
    assert [job.id for job in queue.list_jobs(older_than=dt.timedelta(minutes=30))] == first
    assert [
        job.id for job in queue.list_jobs(older_than=NOW + dt.timedelta(hours=1, seconds=1))
    ] == (first + second)
    (lease,) = queue.lease("w", ["ai"], 1, 30)
    assert [job.id for job in queue.list_jobs("leased")] == [lease.job_id]
    assert [job.id for job in queue.list_jobs("pending", "pacs", 1)] == [first[0]]
    assert queue.list_jobs("dead") == []


def test_get_job_unknown(queue: JobQueue) -> None:
    assert queue.get_job(12345) is None


# -- spool files --------------------------------------------------------------------------
def test_removable_spool_files_keep_for_and_forget(
    repo: Repository, queue: JobQueue, clock: Clock
) -> None:
    for n in (1, 2, 3):
        add(repo, n, "pacs")
    add(repo, 4)  # unrouted: kept for a person, never listed
    leases = queue.lease("w", None, 10, 30)
    assert complete(queue, leases[0])
    clock.advance(600)
    assert complete(queue, leases[1])
    assert queue.removable_spool_files() == [spool(1), spool(2)]
    assert queue.removable_spool_files(limit=1) == [spool(1)]
    assert queue.removable_spool_files(keep_for=dt.timedelta(minutes=5)) == [spool(1)]
    assert queue.forget_spool_file(spool(1))
    assert not queue.forget_spool_file(spool(1))  # already marked
    assert not queue.forget_spool_file(spool(3))  # its job is not done: the file stays
    assert not queue.forget_spool_file(spool(4))
    assert not queue.forget_spool_file("nope.dcm")
    assert queue.removable_spool_files() == [spool(2)]
    assert complete(queue, leases[2])
    assert queue.forget_spool_files([spool(2), spool(3), spool(2)]) == 2
    assert queue.removable_spool_files() == []


# -- queue status -------------------------------------------------------------------------
def test_status_summary_figures(repo: Repository, engine: Engine, clock: Clock) -> None:
    repo.add_destination("idle", "IDLE", "10.0.0.7", 104)
    queue = JobQueue(engine, clock=clock, max_deliveries=3)
    add(repo, 1, "pacs", "ai")  # created at NOW
    clock.advance(400)
    for n in range(2, 6):
        add(repo, n, "pacs")  # created at NOW + 400 s
    leases = queue.lease("w", None, 4, 30)  # pacs 1, ai 1, pacs 2, pacs 3
    # An attempt long ago: outside the window.
    assert queue.complete(leases[0].job_id, leases[0].token, 0, False, NOW, 10)
    clock.advance(60)
    started = clock.now - dt.timedelta(seconds=30)
    assert queue.complete(leases[1].job_id, leases[1].token, 0xB000, True, started, 10)
    assert queue.retry_later(
        leases[2].job_id, leases[2].token, clock.now + dt.timedelta(hours=1), None, "x", started, 1
    )
    assert queue.dead_letter(leases[3].job_id, leases[3].token, "refused", 0xC000, started, 1)
    clock.advance(1)

    summary = queue.status_summary()
    assert summary.now == clock.now and summary.window == dt.timedelta(minutes=5)
    by_name = {d.destination: d for d in summary.destinations}
    assert list(by_name) == ["ai", "idle", "pacs"]
    ai, idle, pacs = by_name["ai"], by_name["idle"], by_name["pacs"]
    assert (pacs.pending, pacs.leased, pacs.retry_wait, pacs.done, pacs.dead) == (2, 0, 1, 1, 1)
    assert (ai.pending, ai.leased, ai.retry_wait, ai.done, ai.dead) == (0, 0, 0, 1, 0)
    assert (idle.pending, idle.done, idle.oldest_pending_age) == (0, 0, None)
    assert pacs.oldest_pending_age == dt.timedelta(seconds=61)  # pacs 2, created at +400
    assert ai.oldest_pending_age is None
    assert (pacs.attempts, pacs.completed, pacs.failed) == (2, 0, 2)
    assert (ai.attempts, ai.completed, ai.failed) == (1, 1, 0)
    assert ai.completed_per_minute == pytest.approx(0.2)
    assert summary.count("pending") == 2 and summary.count("done") == 2
    assert summary.oldest_pending_age == dt.timedelta(seconds=61)
    assert summary.attempts == 3
    assert summary.completed_per_minute == pytest.approx(0.2)

    # Another moment and window: the attempt at NOW counts in the first minute after it.
    early = queue.status_summary(NOW + dt.timedelta(seconds=30), dt.timedelta(minutes=1))
    early_pacs = {d.destination: d for d in early.destinations}["pacs"]
    assert (early_pacs.attempts, early_pacs.completed) == (1, 1)
    assert early_pacs.completed_per_minute == 1.0
    with pytest.raises(ValueError):
        queue.status_summary(window=dt.timedelta(0))


def test_status_summary_of_an_empty_queue(queue: JobQueue) -> None:
    summary = queue.status_summary()
    assert summary.destinations == ()
    assert summary.oldest_pending_age is None and summary.completed_per_minute == 0


# -- the schema change --------------------------------------------------------------------
def test_a_lease_held_across_the_upgrade_still_holds(empty_db_url: str) -> None:
    url = empty_db_url
    upgrade(url, revision="0001")
    engine = make_engine(url)
    try:
        repo = Repository(engine, clock=Clock())
        repo.add_destination("pacs", "PACS", "10.0.0.5", 104)
        add(repo, 1, "pacs")
        add(repo, 2, "pacs")
        with engine.begin() as connection:  # what 0001's JobQueue wrote: owner:token
            connection.execute(
                text(
                    "UPDATE jobs SET state = 'leased', lease_owner = 'w1:abc', deliveries = 1, "
                    "lease_expires_at = '2026-05-01 12:00:30.000000' WHERE id = 1"
                )
            )
            connection.execute(text("UPDATE instances SET state = 'done' WHERE id = 2"))
            connection.execute(text("UPDATE jobs SET state = 'done' WHERE id = 2"))
        engine.dispose()
        upgrade(url, backup=False)
        queue = JobQueue(engine, clock=Clock())
        assert queue.removable_spool_files() == [spool(2)]  # done before: checked again
        assert queue.complete(1, "w1:abc", 0, False, NOW, 1)
        assert queue.removable_spool_files() == [spool(1), spool(2)]  # same time: by id
    finally:
        engine.dispose()


# -- two processes ------------------------------------------------------------------------
def _leaser(url: str, owner: str, out: Any, start: Any) -> None:
    engine = make_engine(url)
    queue = JobQueue(engine)
    with engine.connect():
        pass  # connected before the start: neither may finish before the other begins
    start.wait(30)
    got = [lease.job_id for lease in queue.lease(owner, None, 5, 300)]
    start.wait(30)  # both hold a first batch, then they race for the rest
    while batch := queue.lease(owner, None, 5, 300):
        got.extend(lease.job_id for lease in batch)
    out.put(got)
    engine.dispose()


def lease_in_two_processes(url: str, expected: list[int]) -> list[list[int]]:
    """Two processes lease everything due, 5 at a time; what each got."""
    # fork: the test module is not importable by name in a spawned child (importlib
    # mode); each child makes its own engine, as every process of the node does.
    context = multiprocessing.get_context("fork")
    out, start = context.Queue(), context.Barrier(2)
    workers = [context.Process(target=_leaser, args=(url, f"w{i}", out, start)) for i in range(2)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert not set(results[0]) & set(results[1])
    assert sorted(results[0] + results[1]) == sorted(expected)
    return results


def test_two_processes_never_lease_the_same_job(url: str, repo: Repository) -> None:
    expected = [job for n in range(200) for job in add(repo, n, "pacs")]
    got = lease_in_two_processes(url, expected)
    assert all(got)  # neither waited for the other to finish (SKIP LOCKED on PostgreSQL)


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
    the instance rows not locked on PostgreSQL, each transaction would see the other's
    jobs still leased, and no instance would be done.)"""
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


def test_room_caps_each_destination_and_what_is_left_stays_due(
    repo: Repository, queue: JobQueue
) -> None:
    for n in range(6):
        add(repo, n, "pacs", "ai")
    asked: dict[str, int] = {}

    def room(name: str, associations: int) -> int:
        asked[name] = associations
        return {"pacs": 2, "ai": 0}[name]  # ai: backing off

    leases = queue.lease("w", None, 10, 30, room=room)
    assert [lease.destination for lease in leases] == ["pacs", "pacs"]
    assert asked == {"pacs": 2, "ai": 4}  # asked once each, with max_associations
    rest = queue.lease("w2", None, 10, 30)
    assert sorted(lease.destination for lease in rest) == ["ai"] * 6 + ["pacs"] * 4
