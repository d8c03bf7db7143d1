"""The forwarding side of the database: leasing jobs and recording their attempts.

DESIGN §3.2-3.5. A job moves through these states::

    pending ──lease──> leased ──complete──────> done
       ^                │  │ ──retry_later───> retry_wait ──(next_attempt_at due)──> leased
       │                │  └──dead_letter────> dead ──retry_dead──> pending
       └──release───────┘
                        └──(lease expired: a crash)──> leased again, or dead at the cap

**Leases.** The dispatcher alone calls ``lease``. A lease has an owner (a worker's name),
an expiry and a fresh random token (``jobs.lease_token``). A result — ``complete``,
``retry_later``, ``dead_letter`` or a batch through ``finish_many`` — and a heartbeat
(``extend``) are written only while the job is still leased with that very token; a
worker that lost its lease (its job was re-leased after the expiry) writes nothing and
gets False. A lease past its expiry that nobody has taken yet still holds.

**Deliveries.** A lease handed out is a delivery; ``attempts`` counts only finished
attempts. A job whose lease expired is due again, and leasing it again counts another
delivery, so an instance whose sending kills the worker every time (nothing is ever
recorded for it) is still bounded: ``lease`` dead-letters, instead of leasing, a due job
whose deliveries reached ``max_deliveries`` (a node-wide setting,
``settings.workers.max_deliveries``, default ``MAX_DELIVERIES``) with the reason
"worker crashed N times (D deliveries)", N being the deliveries no result came back
for. It also dead-letters a due job whose finished attempts reached the destination's
cap, ``max(1, destinations.max_retries)`` (the same limits and reasons as
``workers.retry.RetryPolicy``, which normally decides first, after each attempt; this
check catches a cap lowered meanwhile). ``release`` (graceful shutdown) gives leases
back without counting their delivery.

**Order.** Due jobs are pending ones, retry_wait ones whose ``next_attempt_at`` has
come, and leased ones whose lease expired. They are served by DICOM priority — HIGH (1),
MEDIUM (0), LOW (2), PS3.7 9.1.1.1.1 — then by the time they became due
(``next_attempt_at``: the creation time of a new job), then by id: the oldest first.

**Spool files.** When the last job of an instance is done, the instance becomes
``done`` (``done_at`` set) in the same transaction, and ``finish_many`` returns its spool
file name so that the worker can remove it at once. The database is the record of what
is left: ``removable_spool_files`` lists done instances whose file is not yet marked
removed (optionally only those done for a retention period), and
``forget_spool_file(s)`` marks them removed once the file is gone. An instance with a
dead job is never done, so its file stays and ``queue retry`` can send it again; purging
the dead jobs (``purge("dead")``) gives it up, and the instance is done if nothing else
is left to do.

**Transactions and concurrency.** Every method is one transaction. Writes begin with
``BEGIN IMMEDIATE`` on SQLite (the WRITE_OPTION execution option), which serialises
them across processes. On PostgreSQL ``lease`` locks its candidates with ``SELECT … FOR
UPDATE OF jobs SKIP LOCKED``, so concurrent dispatchers never lease the same job; and a
result that may complete an instance locks the instance row (instances in id order,
after every job row of the batch) before counting the jobs left, so that the last two
jobs of an instance finished at the same moment by two workers cannot both miss that
the instance is done.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    union_all,
    update,
)

from router.db.engine import WRITE_OPTION, sync_wal
from router.db.models import (
    LIVE_JOB_STATES,
    AttemptRow,
    DestinationRow,
    InstanceRow,
    InstanceState,
    JobRow,
    JobState,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "MAX_DELIVERIES",
    "OUTCOME_DEAD",
    "OUTCOME_DONE",
    "OUTCOME_RETRY",
    "OUTCOME_WARNING",
    "STATUS_WINDOW",
    "Attempt",
    "DestinationStatus",
    "Job",
    "JobQueue",
    "Lease",
    "Result",
    "StatusSummary",
]

#: Default cap on leases handed out for one job (crashed deliveries included).
MAX_DELIVERIES = 15
#: ``attempts.outcome`` values (the same words as ``workers.retry.Verdict``).
OUTCOME_DONE = "done"
OUTCOME_WARNING = "done_with_warning"
OUTCOME_RETRY = "retry"
OUTCOME_DEAD = "dead"
COMPLETED_OUTCOMES = (OUTCOME_DONE, OUTCOME_WARNING)
FAILED_OUTCOMES = (OUTCOME_RETRY, OUTCOME_DEAD)
#: The recent past that ``status_summary`` reports throughput over.
STATUS_WINDOW = dt.timedelta(minutes=5)
_FINAL_STATES = (JobState.DONE, JobState.RETRY_WAIT, JobState.DEAD)


# -- values out ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Lease:
    job_id: int
    instance_id: int
    destination: str
    ae_title: str
    host: str
    port: int
    max_associations: int
    max_retries: int
    spool_name: str
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    token: str  # random; a result is written only while the job still carries it
    expires_at: dt.datetime
    attempts: int  # finished attempts before this delivery
    deliveries: int  # leases handed out, this one included
    study_instance_uid: str | None = None  # for the worker's audit records
    tls: bool = False  # the destination is set to TLS (its files: the worker reads them)

    @property
    def suspect(self) -> bool:
        """An earlier delivery of this job ended with no result (its lease expired: the
        worker died or lost it), so this job may be what kills workers (FI-08)."""
        return self.deliveries - 1 > self.attempts


class Leases(list[Lease]):
    """What ``lease`` handed out, and how many due suspects it passed over (they wait
    for a worker that holds nothing else)."""

    suspects_skipped: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """One finished attempt, to record under its lease (``finish_many``). Only the
    lease's ``job_id`` and ``token`` are read."""

    lease: Lease
    state: JobState  # done, retry_wait or dead
    outcome: str
    started_at: dt.datetime
    duration_ms: int
    dimse_status: int | None = None
    error: str | None = None
    next_attempt_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    started_at: dt.datetime
    duration_ms: int
    outcome: str
    dimse_status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    instance_id: int
    destination: str
    state: str
    priority: int
    attempts: int
    deliveries: int
    next_attempt_at: dt.datetime
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """One destination's jobs per state, and its attempts within the window."""

    destination: str
    window: dt.timedelta
    pending: int = 0
    leased: int = 0
    retry_wait: int = 0
    done: int = 0
    dead: int = 0
    #: Age of its oldest job still to do (pending, leased or retry_wait); None: none.
    oldest_pending_age: dt.timedelta | None = None
    attempts: int = 0  # attempts started within the window
    completed: int = 0  # ... that completed their job (success or warning)
    failed: int = 0  # ... that failed (to be retried, or dead-lettered)

    @property
    def completed_per_minute(self) -> float:
        return self.completed / (self.window.total_seconds() / 60)


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """``queue status``: every destination (also those without jobs), by name."""

    now: dt.datetime
    window: dt.timedelta
    destinations: tuple[DestinationStatus, ...]

    def count(self, state: str) -> int:
        return sum(int(getattr(d, JobState(state).value)) for d in self.destinations)

    @property
    def oldest_pending_age(self) -> dt.timedelta | None:
        ages = [d.oldest_pending_age for d in self.destinations if d.oldest_pending_age]
        return max(ages) if ages else None

    @property
    def attempts(self) -> int:
        return sum(d.attempts for d in self.destinations)

    @property
    def completed_per_minute(self) -> float:
        return sum(d.completed for d in self.destinations) / (self.window.total_seconds() / 60)


class _Finished(NamedTuple):
    job_id: int
    token: str
    state: JobState
    outcome: str
    started_at: dt.datetime
    duration_ms: int
    dimse_status: int | None
    error: str | None
    next_attempt_at: dt.datetime | None


# -- statements, built once ---------------------------------------------------------------
_JOBS: Table = JobRow.__table__  # type: ignore[assignment]
_DESTINATIONS: Table = DestinationRow.__table__  # type: ignore[assignment]
_INSTANCES: Table = InstanceRow.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = AttemptRow.__table__  # type: ignore[assignment]
_J, _D, _I, _A = _JOBS.c, _DESTINATIONS.c, _INSTANCES.c, _ATTEMPTS.c


def _time(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


# PS3.7 9.1.1.1.1 priority: 1 HIGH, 0 MEDIUM, 2 LOW, served in that order; any other
# value (the listener tolerates them) counts as MEDIUM.
def _rank(priority: int) -> int:
    return 0 if priority == 1 else 2 if priority == 2 else 1


_NOW = _time("now")
_OF_DESTINATION = _J.destination_id == bindparam("destination")
# Each part is one range of ix_jobs_destination_id_state_priority_next_attempt_at, read
# in index order (the rare priorities
# outside 0-2 are sorted, being few): a lease costs a few index seeks per destination,
# however long the backlog, and a destination left out (at its limit, backing off)
# costs nothing. Leased jobs are few, so expired leases need no split by priority.
_DUE_PARTS = tuple(
    [
        and_(_J.state == state, priority, *extra)
        for state, extra in (
            (JobState.PENDING, ()),
            (JobState.RETRY_WAIT, (_J.next_attempt_at <= _NOW,)),
        )
        for priority in (
            _J.priority == 1,
            _J.priority == 0,
            _J.priority == 2,
            _J.priority < 0,
            _J.priority > 2,
        )
    ]
    + [and_(_J.state == JobState.LEASED, _J.lease_expires_at <= _NOW)]
)
_DUE = or_(
    _J.state == JobState.PENDING,
    and_(_J.state == JobState.RETRY_WAIT, _J.next_attempt_at <= _NOW),
    and_(_J.state == JobState.LEASED, _J.lease_expires_at <= _NOW),
)
# Phase 1: the first ``limit`` due jobs of each part, for one destination.
_DUE_OF_DESTINATION = union_all(
    *(
        select(
            select(_J.id, _J.priority, _J.next_attempt_at)
            .where(_OF_DESTINATION, part)
            .order_by(_J.next_attempt_at, _J.id)
            .limit(bindparam("limit"))
            .subquery()
        )
        for part in _DUE_PARTS
    )
)
_DESTINATION_NAMES = select(_D.id, _D.name, _D.max_associations)


@cache
def _chosen(skip_locked: bool) -> Select[Any]:
    """Phase 2: the chosen jobs, still due, with everything a Lease carries; locked on
    PostgreSQL (rows another transaction holds are skipped)."""
    query = (
        select(
            _J.id,
            _J.instance_id,
            _D.name,
            _D.ae_title,
            _D.host,
            _D.port,
            _D.max_associations,
            _D.max_retries,
            _D.tls,
            _I.spool_name,
            _I.transfer_syntax,
            _I.sop_class_uid,
            _I.sop_instance_uid,
            _I.study_instance_uid,
            _J.priority,
            _J.attempts,
            _J.deliveries,
        )
        .select_from(
            _JOBS.join(_DESTINATIONS, _D.id == _J.destination_id).join(
                _INSTANCES, _I.id == _J.instance_id
            )
        )
        .where(_J.id.in_(bindparam("ids", expanding=True)), _DUE)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True, of=_JOBS)
    return query


_LEASE = (
    update(_JOBS)
    .where(_J.id == bindparam("b_id"))
    .values(
        state=JobState.LEASED,
        lease_owner=bindparam("b_owner"),
        lease_token=bindparam("b_token"),
        lease_expires_at=_time("b_expires"),
        deliveries=_J.deliveries + 1,
        updated_at=_time("b_now"),
    )
)
_DEAD_AT_LEASE = (
    update(_JOBS)
    .where(_J.id == bindparam("b_id"))
    .values(
        state=JobState.DEAD,
        lease_owner=None,
        lease_token=None,
        lease_expires_at=None,
        last_error=bindparam("b_reason"),
        updated_at=_time("b_now"),
    )
)
_HOLDS = and_(_J.id == bindparam("b_id"), _J.state == JobState.LEASED)
_FINISH = (
    update(_JOBS)
    .where(_HOLDS, _J.lease_token == bindparam("b_token"))
    .values(
        state=bindparam("b_state", type_=_J.state.type),
        attempts=_J.attempts + 1,
        lease_owner=None,
        lease_token=None,
        lease_expires_at=None,
        last_status=bindparam("b_status"),
        last_error=bindparam("b_error"),
        next_attempt_at=_time("b_next"),
        updated_at=_time("b_now"),
    )
    .returning(_J.instance_id, _J.destination_id)
)
_EXTEND = (
    update(_JOBS)
    .where(_HOLDS, _J.lease_token == bindparam("b_token"))
    .values(lease_expires_at=_time("b_expires"))
)
_INSERT_ATTEMPT = insert(_ATTEMPTS)
_LOCK_INSTANCE = select(_I.id).where(_I.id == bindparam("b_instance")).with_for_update()
_NOTHING_LEFT = ~exists().where(
    _J.instance_id == bindparam("b_instance"), _J.state != JobState.DONE
)
_COMPLETE_INSTANCE = (
    update(_INSTANCES)
    .where(_I.id == bindparam("b_instance"), _I.state == InstanceState.ROUTED, _NOTHING_LEFT)
    .values(state=InstanceState.DONE, done_at=_time("b_now"))
)
_COMPLETE_INSTANCE_NAMED = _COMPLETE_INSTANCE.returning(_I.spool_name)
_JOB_COLUMNS = (
    _J.id,
    _J.instance_id,
    _D.name,
    _J.state,
    _J.priority,
    _J.attempts,
    _J.deliveries,
    _J.next_attempt_at,
    _J.last_status,
    _J.last_error,
    _J.created_at,
    _J.updated_at,
    _J.lease_owner,
    _J.lease_expires_at,
)
_JOBS_WITH_NAMES = _JOBS.join(_DESTINATIONS, _D.id == _J.destination_id)


def _exhausted(attempts: int, deliveries: int, max_retries: int, max_deliveries: int) -> str | None:
    """Why a due job goes to dead letter instead of being leased (cf. RetryPolicy)."""
    if deliveries >= max_deliveries:
        crashes = deliveries - attempts
        if crashes > 0:
            return f"worker crashed {crashes} times ({deliveries} deliveries)"
        return f"gave up after {deliveries} deliveries"
    if attempts >= max(1, max_retries):
        return f"gave up after {attempts} attempts"
    return None


def _lease(row: Any, token: str, expires: dt.datetime) -> Lease:
    return Lease(
        job_id=row.id,
        instance_id=row.instance_id,
        destination=row.name,
        ae_title=row.ae_title,
        host=row.host,
        port=row.port,
        max_associations=row.max_associations,
        max_retries=row.max_retries,
        spool_name=row.spool_name,
        transfer_syntax=row.transfer_syntax,
        sop_class_uid=row.sop_class_uid,
        sop_instance_uid=row.sop_instance_uid,
        priority=row.priority,
        token=token,
        expires_at=expires,
        attempts=row.attempts,
        deliveries=row.deliveries + 1,
        study_instance_uid=row.study_instance_uid,
        tls=bool(row.tls),
    )


def _job(row: Any, history: tuple[Attempt, ...] = ()) -> Job:
    (
        id_,
        instance_id,
        destination,
        state,
        priority,
        attempts,
        deliveries,
        next_attempt_at,
        last_status,
        last_error,
        created_at,
        updated_at,
        lease_owner,
        lease_expires_at,
    ) = row
    return Job(
        id=id_,
        instance_id=instance_id,
        destination=destination,
        state=str(JobState(state)),
        priority=priority,
        attempts=attempts,
        deliveries=deliveries,
        next_attempt_at=next_attempt_at,
        last_status=last_status,
        last_error=last_error,
        created_at=created_at,
        updated_at=updated_at,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
        history=history,
    )


def _aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime for {what}: use an aware UTC datetime")
    return value


def _of_destination(destination: str) -> Any:
    return _J.destination_id == (select(_D.id).where(_D.name == destination).scalar_subquery())


def _apart(candidates: list[Any], alone: bool) -> tuple[list[Any], bool, int]:
    """The candidates to lease when suspects (deliveries > attempts) must not go with
    other jobs: the first suspect by itself when ``alone`` allows one, else the others;
    whether a suspect was kept, and how many were passed over."""
    suspects = [row for row in candidates if row.deliveries > row.attempts]
    if alone and suspects:
        return suspects[:1], True, len(suspects) - 1
    return [row for row in candidates if row.deliveries <= row.attempts], False, len(suspects)


class JobQueue:
    """The job queue of the forwarding side; see the module's docstring."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], dt.datetime] = utcnow,
        max_deliveries: int = MAX_DELIVERIES,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self._engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self._clock = clock
        self.max_deliveries = max_deliveries

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as connection:
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as connection, connection.begin():
            yield connection

    # -- leasing ------------------------------------------------------------------------
    def lease(
        self,
        owner: str,
        destinations: Collection[str] | None,
        limit: int,
        lease_seconds: float,
        exclude_destinations: Collection[str] = (),
        room: Callable[[str, int], int] | None = None,
        suspects: Literal["any", "alone", "skip"] = "any",
    ) -> Leases:
        """Lease up to ``limit`` due jobs of ``destinations`` (None: all of them, less
        ``exclude_destinations``: those at their association limit or backing off), by
        priority then age. ``room(name, max_associations)``, when given, caps how many
        jobs of each destination this call may lease (the dispatcher's per-destination
        limit: a destination that never answers must not take a worker's whole credit);
        a job over its destination's room stays due. Due jobs past a cap are
        dead-lettered on the way, and do not count against ``limit``.

        ``suspects`` decides what happens to a due job an earlier delivery of which
        ended with no result (deliveries > attempts: a worker died holding it). With
        "any" it is leased like the others. With "alone" it is leased only as the first
        and only lease of the call, and passed over otherwise; with "skip" it is always
        passed over: a poison instance that kills its worker then takes no innocent job
        down with it, whose deliveries would count towards ``max_deliveries`` too
        (FI-08). Passed-over suspects stay due and are counted in the result."""
        if limit <= 0 or lease_seconds <= 0 or (destinations is not None and not destinations):
            return Leases()
        now = self._clock()
        expires = now + dt.timedelta(seconds=lease_seconds)
        params: dict[str, Any] = {"now": now}
        if destinations is not None:
            params["names"] = list(destinations)
        if exclude_destinations:
            params["excluded"] = list(exclude_destinations)
        leases = Leases()
        seen: set[int] = set()  # candidates of this call: leased, dead-lettered or skipped
        alone = False  # a suspect was leased: nothing else goes with it
        with self._write() as connection:
            found = self._targets(connection, destinations, exclude_destinations)
            # Room left per destination name; a destination with none is not read at all.
            left = {name: room(name, n) for name, n in found.values()} if room else {}
            names = {id_: name for id_, (name, _) in found.items()}
            targets = [id_ for id_, name in names.items() if left.get(name, 1) > 0]
            chosen_query = _chosen(connection.dialect.name == "postgresql")
            while len(leases) < limit and targets:
                wanted = limit - len(leases)
                order = self._due(connection, targets, wanted, len(seen), now, seen)
                if not order:
                    break
                seen.update(order)
                rows = {
                    row.id: row
                    for row in connection.execute(chosen_query, {"ids": order, "now": now})
                }
                dead: list[dict[str, Any]] = []
                candidates = []
                for job_id in order:
                    row = rows.get(job_id)
                    if row is None:  # no longer due, or locked by another transaction
                        continue
                    reason = _exhausted(
                        row.attempts, row.deliveries, row.max_retries, self.max_deliveries
                    )
                    if reason is not None:
                        dead.append({"b_id": row.id, "b_reason": reason, "b_now": now})
                    elif left.get(row.name, 1) > 0:  # else it stays due (and seen)
                        candidates.append(row)
                if suspects != "any":
                    candidates, alone, skipped = _apart(
                        candidates, suspects == "alone" and not leases
                    )
                    leases.suspects_skipped += skipped
                chosen: list[dict[str, Any]] = []
                for row in candidates:
                    if row.name in left:
                        if left[row.name] <= 0:
                            continue  # stays due; seen, so not read again in this call
                        left[row.name] -= 1
                    token = secrets.token_hex(16)
                    chosen.append(
                        {
                            "b_id": row.id,
                            "b_owner": owner,
                            "b_token": token,
                            "b_expires": expires,
                            "b_now": now,
                        }
                    )
                    leases.append(_lease(row, token, expires))
                if dead:
                    connection.execute(_DEAD_AT_LEASE, dead)
                if chosen:
                    connection.execute(_LEASE, chosen)
                if alone or len(order) < wanted:
                    break  # a suspect goes alone, or everything due was looked at
                targets = [id_ for id_ in targets if left.get(names[id_], 1) > 0]
        return leases

    @staticmethod
    def _targets(
        connection: Connection,
        destinations: Collection[str] | None,
        excluded: Collection[str],
    ) -> dict[int, tuple[str, int]]:
        """The destinations to lease for: id -> (name, max_associations)."""
        wanted = None if destinations is None else set(destinations)
        left_out = set(excluded)
        return {
            id_: (name, associations)
            for id_, name, associations in connection.execute(_DESTINATION_NAMES)
            if (wanted is None or name in wanted) and name not in left_out
        }

    @staticmethod
    def _due(
        connection: Connection,
        targets: Sequence[int],
        wanted: int,
        extra: int,
        now: dt.datetime,
        seen: set[int],
    ) -> list[int]:
        """The ids of the first ``wanted`` due jobs not in ``seen``, in serving order
        (``extra``: how many of those read may be in ``seen``)."""
        found: list[tuple[int, dt.datetime, int]] = []
        for destination in targets:
            params = {"destination": destination, "limit": wanted + extra, "now": now}
            for job_id, priority, due_at in connection.execute(_DUE_OF_DESTINATION, params):
                if job_id not in seen:
                    found.append((_rank(priority), due_at, job_id))
        found.sort()
        return [job_id for _, _, job_id in found[:wanted]]

    def extend(self, job_id: int, token: str, lease_seconds: float) -> bool:
        """Heartbeat: push the expiry out to ``lease_seconds`` from now while the lease
        holds."""
        expires = self._clock() + dt.timedelta(seconds=lease_seconds)
        with self._write() as connection:
            result = connection.execute(
                _EXTEND, {"b_id": job_id, "b_token": token, "b_expires": expires}
            )
            return bool(result.rowcount)

    def lease_covers(self, token: str, spool_name: str) -> bool:
        """Whether ``token`` holds a lease on a job of the instance stored as
        ``spool_name``: the dispatcher serves a spool file's bytes to a worker on another
        host only then (DESIGN §3, fetch messages)."""
        if not token:
            return False
        with self._read() as connection:
            row = connection.execute(
                select(_J.id)
                .join(_INSTANCES, _I.id == _J.instance_id)
                .where(
                    _J.state == JobState.LEASED,
                    _J.lease_token == token,
                    _I.spool_name == spool_name,
                )
                .limit(1)
            ).first()
            return row is not None

    def release(self, owner: str) -> int:
        """Graceful shutdown: every lease of ``owner`` goes back to pending, and its
        delivery is not counted. Returns how many."""
        now = self._clock()
        with self._write() as connection:
            result = connection.execute(
                update(_JOBS)
                .where(_J.state == JobState.LEASED, _J.lease_owner == owner)
                .values(
                    state=JobState.PENDING,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    deliveries=case((_J.deliveries > 0, _J.deliveries - 1), else_=0),
                    updated_at=now,
                )
            )
            return int(result.rowcount)

    # -- results (written only while the lease holds) -----------------------------------
    def complete(
        self,
        job_id: int,
        token: str,
        status: int | None,
        warning: bool,
        started: dt.datetime,
        duration_ms: int,
    ) -> bool:
        """The destination stored the instance (``warning``: with a warning status).
        Records the attempt, marks the job done and, if it was its instance's last job,
        the instance too (its spool file is then in ``removable_spool_files``). False,
        writing nothing, when the lease no longer holds."""
        outcome = OUTCOME_WARNING if warning else OUTCOME_DONE
        finished = _Finished(
            job_id, token, JobState.DONE, outcome, started, duration_ms, status, None, None
        )
        return self._finish([finished])[0] is not None

    def retry_later(
        self,
        job_id: int,
        token: str,
        next_attempt_at: dt.datetime,
        status: int | None,
        error: str | None,
        started: dt.datetime,
        duration_ms: int,
    ) -> bool:
        """A failed attempt to repeat at ``next_attempt_at`` (retry_wait)."""
        _aware(next_attempt_at, "next_attempt_at")
        finished = _Finished(
            job_id,
            token,
            JobState.RETRY_WAIT,
            OUTCOME_RETRY,
            started,
            duration_ms,
            status,
            error,
            next_attempt_at,
        )
        return self._finish([finished])[0] is not None

    def dead_letter(
        self,
        job_id: int,
        token: str,
        reason: str,
        status: int | None,
        started: dt.datetime,
        duration_ms: int,
    ) -> bool:
        """A failed attempt not worth repeating: the job is dead until ``retry_dead``."""
        finished = _Finished(
            job_id, token, JobState.DEAD, OUTCOME_DEAD, started, duration_ms, status, reason, None
        )
        return self._finish([finished])[0] is not None

    def finish(
        self,
        lease: Lease,
        state: JobState,
        *,
        outcome: str,
        started_at: dt.datetime,
        duration_ms: int,
        dimse_status: int | None = None,
        error: str | None = None,
        next_attempt_at: dt.datetime | None = None,
    ) -> bool:
        """One ``Result``: see ``finish_many``."""
        result = Result(
            lease, state, outcome, started_at, duration_ms, dimse_status, error, next_attempt_at
        )
        return self.finish_many([result])[0] is not None

    def finish_many(self, results: Sequence[Result]) -> list[str | None]:
        """Record a batch of results in ONE transaction (a worker's group commit). For
        each: None when its lease no longer held (nothing written for it), else "" or,
        when it completed its instance, that instance's spool file name (removable)."""
        finished = []
        for r in results:
            if r.state not in _FINAL_STATES:
                raise ValueError(f"a finished attempt cannot leave the job {r.state}")
            finished.append(
                _Finished(
                    r.lease.job_id,
                    r.lease.token,
                    JobState(r.state),
                    r.outcome,
                    r.started_at,
                    r.duration_ms,
                    r.dimse_status,
                    r.error,
                    r.next_attempt_at,
                )
            )
        return self._finish(finished)

    def _finish(self, batch: Sequence[_Finished]) -> list[str | None]:
        for item in batch:
            _aware(item.started_at, "started_at")
        now = self._clock()
        out: list[str | None] = []
        attempts: list[dict[str, Any]] = []
        completing: dict[int, int] = {}  # instance id -> index of its last done result
        with self._write() as connection:
            for index, item in enumerate(batch):
                row = connection.execute(
                    _FINISH,
                    {
                        "b_id": item.job_id,
                        "b_token": item.token,
                        "b_state": item.state,
                        "b_status": item.dimse_status,
                        "b_error": item.error,
                        "b_next": item.next_attempt_at or now,
                        "b_now": now,
                    },
                ).one_or_none()
                if row is None:
                    out.append(None)
                    continue
                out.append("")
                attempts.append(
                    {
                        "job_id": item.job_id,
                        "destination_id": row.destination_id,
                        "started_at": item.started_at,
                        "duration_ms": item.duration_ms,
                        "outcome": item.outcome,
                        "dimse_status": item.dimse_status,
                        "error": item.error,
                    }
                )
                if item.state is JobState.DONE:
                    completing[row.instance_id] = index
            if attempts:
                connection.execute(_INSERT_ATTEMPT, attempts)
            lock = connection.dialect.name == "postgresql"
            for instance_id in sorted(completing):  # one lock order: no deadlock
                params = {"b_instance": instance_id, "b_now": now}
                if lock:
                    connection.execute(_LOCK_INSTANCE, params)
                name = connection.execute(_COMPLETE_INSTANCE_NAMED, params).scalar_one_or_none()
                if name is not None:
                    out[completing[instance_id]] = str(name)
        return out

    # -- spool files ----------------------------------------------------------------------
    def sync(self) -> None:
        """Make every commit so far durable, results written with ``durable=False``
        included (``router/db/engine.py`` ``sync_wal``): before a file is removed because
        a result said its instance is done."""
        sync_wal(self._engine)

    def removable_spool_files(
        self, limit: int = 1000, keep_for: dt.timedelta = dt.timedelta(0)
    ) -> list[str]:
        """Spool files of done instances not yet marked removed, done at least
        ``keep_for`` ago (a retention period), the longest done first. Remove each
        (a missing file is fine: the worker may have removed it already), then
        ``forget_spool_file`` it."""
        cutoff = self._clock() - keep_for
        with self._read() as connection:
            return list(
                connection.execute(
                    select(_I.spool_name)
                    .where(
                        _I.state == InstanceState.DONE,
                        _I.spool_removed_at.is_(None),
                        _I.done_at <= cutoff,
                    )
                    .order_by(_I.done_at, _I.id)
                    .limit(limit)
                ).scalars()
            )

    def forget_spool_file(self, name: str) -> bool:
        """Mark a done instance's spool file removed; False if there is no such done
        instance with its file not yet marked removed."""
        return self.forget_spool_files([name]) == 1

    def forget_spool_files(self, names: Iterable[str]) -> int:
        """``forget_spool_file`` for many names in one transaction; how many changed."""
        wanted = list(dict.fromkeys(names))
        now = self._clock()
        changed = 0
        with self._write() as connection:
            for start in range(0, len(wanted), 500):
                changed += connection.execute(
                    update(_INSTANCES)
                    .where(
                        _I.spool_name.in_(wanted[start : start + 500]),
                        _I.state == InstanceState.DONE,
                        _I.spool_removed_at.is_(None),
                    )
                    .values(spool_removed_at=now)
                ).rowcount
        return changed

    # -- operators ------------------------------------------------------------------------
    def retry_dead(self, job_id: int | None = None, destination: str | None = None) -> int:
        """`queue retry`: dead-lettered jobs (one, those of a destination, or all)
        become pending again with fresh counters. Returns how many."""
        now = self._clock()
        where = [_J.state == JobState.DEAD]
        if job_id is not None:
            where.append(_J.id == job_id)
        if destination is not None:
            where.append(_of_destination(destination))
        with self._write() as connection:
            result = connection.execute(
                update(_JOBS)
                .where(*where)
                .values(
                    state=JobState.PENDING,
                    attempts=0,
                    deliveries=0,
                    next_attempt_at=now,
                    last_status=None,
                    last_error=None,
                    updated_at=now,
                )
            )
            return int(result.rowcount)

    def purge(self, state: str, destination: str | None = None) -> int:
        """`queue purge`: delete done or dead jobs (with their attempts). An instance
        left with nothing to do (its dead jobs purged) becomes done, so its spool file
        may go. Returns how many jobs were deleted."""
        if state not in (JobState.DONE, JobState.DEAD):
            raise ValueError("only done or dead jobs can be purged")
        where = [_J.state == state]
        if destination is not None:
            where.append(_of_destination(destination))
        now = self._clock()
        with self._write() as connection:
            deleted = list(
                connection.execute(delete(_JOBS).where(*where).returning(_J.instance_id)).scalars()
            )
            if state == JobState.DEAD and deleted:
                connection.execute(
                    _COMPLETE_INSTANCE,
                    [{"b_instance": i, "b_now": now} for i in sorted(set(deleted))],
                )
            return len(deleted)

    # -- reading --------------------------------------------------------------------------
    def list_jobs(
        self,
        state: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        *,
        older_than: dt.timedelta | dt.datetime | None = None,
    ) -> list[Job]:
        """`queue list`: jobs, oldest first, optionally of one state and destination,
        and created before a time (or longer ago than a duration)."""
        query = (
            select(*_JOB_COLUMNS)
            .select_from(_JOBS_WITH_NAMES)
            .order_by(_J.created_at, _J.id)
            .limit(limit)
        )
        if state is not None:
            query = query.where(_J.state == JobState(state))
        if destination is not None:
            query = query.where(_D.name == destination)
        if older_than is not None:
            if isinstance(older_than, dt.timedelta):
                older_than = self._clock() - older_than
            query = query.where(_J.created_at < _aware(older_than, "older_than"))
        with self._read() as connection:
            return [_job(row) for row in connection.execute(query)]

    def get_job(self, job_id: int) -> Job | None:
        """`queue show`: one job with every attempt, oldest first; None if unknown."""
        with self._read() as connection:
            row = connection.execute(
                select(*_JOB_COLUMNS).select_from(_JOBS_WITH_NAMES).where(_J.id == job_id)
            ).one_or_none()
            if row is None:
                return None
            history = tuple(
                Attempt(*a)
                for a in connection.execute(
                    select(_A.started_at, _A.duration_ms, _A.outcome, _A.dimse_status, _A.error)
                    .where(_A.job_id == job_id)
                    .order_by(_A.id)
                )
            )
            return _job(row, history)

    def attempt_counts(self) -> list[tuple[str, str, int]]:
        """(destination, outcome, attempts) over every recorded attempt (the metrics'
        attempts counter; one grouped scan of the attempts table per scrape)."""
        with self._read() as connection:
            rows = connection.execute(
                select(_D.name, _A.outcome, func.count(_A.id))
                .select_from(_ATTEMPTS.join(_DESTINATIONS, _D.id == _A.destination_id))
                .group_by(_D.name, _A.outcome)
                .order_by(_D.name, _A.outcome)
            )
            return [(str(name), str(outcome), int(count)) for name, outcome, count in rows]

    def status_summary(
        self, now: dt.datetime | None = None, window: dt.timedelta = STATUS_WINDOW
    ) -> StatusSummary:
        """`queue status`: per destination, its jobs per state, the age of its oldest
        job still to do, and its attempts started within ``window`` before ``now``
        (those that completed their job, those that failed)."""
        now = _aware(now, "now") if now is not None else self._clock()
        if window <= dt.timedelta(0):
            raise ValueError("the window must be positive")
        counts: dict[str, dict[str, Any]] = {}
        with self._read() as connection:
            for name, state, total in connection.execute(
                select(_D.name, _J.state, func.count(_J.id))
                .select_from(_DESTINATIONS.outerjoin(_JOBS, _J.destination_id == _D.id))
                .group_by(_D.name, _J.state)
            ):
                entry = counts.setdefault(name, {})
                if state is not None:
                    entry[JobState(state).value] = total
            for name, oldest in connection.execute(
                select(_D.name, func.min(_J.created_at))
                .select_from(_JOBS_WITH_NAMES)
                .where(_J.state.in_(LIVE_JOB_STATES))
                .group_by(_D.name)
            ):
                counts[name]["oldest_pending_age"] = max(now - oldest, dt.timedelta(0))
            for name, attempts, completed, failed in connection.execute(
                select(
                    _D.name,
                    func.count(_A.id),
                    func.sum(case((_A.outcome.in_(COMPLETED_OUTCOMES), 1), else_=0)),
                    func.sum(case((_A.outcome.in_(FAILED_OUTCOMES), 1), else_=0)),
                )
                .select_from(_ATTEMPTS.join(_DESTINATIONS, _D.id == _A.destination_id))
                .where(_A.started_at >= now - window, _A.started_at <= now)
                .group_by(_D.name)
            ):
                counts[name].update(
                    attempts=attempts, completed=int(completed or 0), failed=int(failed or 0)
                )
        return StatusSummary(
            now,
            window,
            tuple(
                DestinationStatus(name, window, **fields) for name, fields in sorted(counts.items())
            ),
        )
