"""The forwarding side of the database: leasing jobs and recording their attempts.

DESIGN §3.2: the dispatcher alone leases jobs, each lease has an expiry, and a result is
written only while its lease still holds (a worker that lost its lease — it was too
slow, or the job was re-leased after its expiry — writes nothing). A lease handed out is
a *delivery*; deliveries are counted apart from finished attempts, so an instance whose
sending kills the worker every time is dead-lettered after ``max_deliveries`` even
though no attempt ever finished. The lease token lives in ``jobs.lease_owner`` as
``owner:token``.

Every method is one transaction; writes begin with BEGIN IMMEDIATE on SQLite, and the
candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
dispatchers never lease the same job.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, case, delete, func, or_, select, update

from router.db.engine import WRITE_OPTION
from router.db.models import (
    AttemptRow,
    DestinationRow,
    InstanceRow,
    InstanceState,
    JobRow,
    JobState,
    utcnow,
)

# PS3.7 9.1.1.1.1 priority: 1 HIGH, 0 MEDIUM, 2 LOW; served in that order.
_PRIORITY_RANK = case((JobRow.priority == 1, 0), (JobRow.priority == 2, 2), else_=1)


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
    token: str  # "owner:random"; a result is written only while the job still holds it
    expires_at: dt.datetime
    attempts: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class Result:
    """One finished attempt, to record under its lease."""

    lease: Lease
    state: JobState
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
    history: tuple[Attempt, ...] = ()


_JOB_COLUMNS = (
    JobRow.id,
    JobRow.instance_id,
    DestinationRow.name,
    JobRow.state,
    JobRow.priority,
    JobRow.attempts,
    JobRow.deliveries,
    JobRow.next_attempt_at,
    JobRow.last_status,
    JobRow.last_error,
    JobRow.created_at,
)


class JobQueue:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], dt.datetime] = utcnow,
        max_deliveries: int = 15,
    ) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self._clock = clock
        self.max_deliveries = max_deliveries

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as connection:
            yield connection

    # -- leasing ------------------------------------------------------------------------
    def lease(
        self,
        owner: str,
        destinations: Collection[str] | None,
        limit: int,
        lease_seconds: float,
    ) -> list[Lease]:
        """Lease up to ``limit`` due jobs, highest priority first, then oldest."""
        now = self._clock()
        due = or_(
            JobRow.state == JobState.PENDING,
            and_(JobRow.state == JobState.RETRY_WAIT, JobRow.next_attempt_at <= now),
            and_(JobRow.state == JobState.LEASED, JobRow.lease_expires_at <= now),
        )
        query = (
            select(JobRow.id, JobRow.deliveries)
            .join(DestinationRow, DestinationRow.id == JobRow.destination_id)
            .where(due)
            .order_by(_PRIORITY_RANK, JobRow.next_attempt_at, JobRow.id)
        )
        if destinations is not None:
            query = query.where(DestinationRow.name.in_(list(destinations)))
        with self._write() as connection:
            if connection.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=JobRow)
            candidates = connection.execute(query.limit(limit)).all()
            chosen: list[int] = []
            exhausted: list[int] = []
            for job_id, deliveries in candidates:
                (exhausted if deliveries >= self.max_deliveries else chosen).append(job_id)
            if exhausted:
                connection.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(exhausted))
                    .values(
                        state=JobState.DEAD,
                        lease_owner=None,
                        lease_expires_at=None,
                        last_error=f"worker crashed {self.max_deliveries} times",
                        updated_at=now,
                    )
                )
            expires = now + dt.timedelta(seconds=lease_seconds)
            out = []
            for job_id in chosen:
                token = f"{owner}:{secrets.token_hex(8)}"
                connection.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(
                        state=JobState.LEASED,
                        lease_owner=token,
                        lease_expires_at=expires,
                        deliveries=JobRow.deliveries + 1,
                        updated_at=now,
                    )
                )
                out.append(self._lease(connection, job_id, token, expires))
            return out

    def _lease(
        self, connection: Connection, job_id: int, token: str, expires: dt.datetime
    ) -> Lease:
        row = connection.execute(
            select(
                JobRow.id,
                JobRow.instance_id,
                DestinationRow.name,
                DestinationRow.ae_title,
                DestinationRow.host,
                DestinationRow.port,
                DestinationRow.max_associations,
                DestinationRow.max_retries,
                InstanceRow.spool_name,
                InstanceRow.transfer_syntax,
                InstanceRow.sop_class_uid,
                InstanceRow.sop_instance_uid,
                JobRow.priority,
                JobRow.attempts,
                JobRow.deliveries,
            )
            .join(DestinationRow, DestinationRow.id == JobRow.destination_id)
            .join(InstanceRow, InstanceRow.id == JobRow.instance_id)
            .where(JobRow.id == job_id)
        ).one()
        return Lease(
            job_id=row[0],
            instance_id=row[1],
            destination=row[2],
            ae_title=row[3],
            host=row[4],
            port=row[5],
            max_associations=row[6],
            max_retries=row[7],
            spool_name=row[8],
            transfer_syntax=row[9],
            sop_class_uid=row[10],
            sop_instance_uid=row[11],
            priority=row[12],
            token=token,
            expires_at=expires,
            attempts=row[13],
            deliveries=row[14],
        )

    # -- results (written only while the lease holds) -----------------------------------
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
        """Record one attempt and move the job to ``state`` (done, retry_wait or dead).
        Returns False, writing nothing, when the lease no longer holds."""
        result = Result(
            lease, state, outcome, started_at, duration_ms, dimse_status, error, next_attempt_at
        )
        return self.finish_many([result])[0] is not None

    def finish_many(self, results: Sequence[Result]) -> list[str | None]:
        """``finish`` for a batch in ONE transaction (a worker's group commit). For each
        result: None when its lease no longer held (nothing written), else "" or, when
        the job completed its instance, that instance's spool file name (now removable)."""
        for result in results:
            if result.state not in (JobState.DONE, JobState.RETRY_WAIT, JobState.DEAD):
                raise ValueError(f"a finished attempt cannot leave the job {result.state}")
        now = self._clock()
        with self._write() as connection:
            return [self._finish_one(connection, result, now) for result in results]

    def _finish_one(self, connection: Connection, result: Result, now: dt.datetime) -> str | None:
        lease = result.lease
        changed = connection.execute(
            update(JobRow)
            .where(
                JobRow.id == lease.job_id,
                JobRow.state == JobState.LEASED,
                JobRow.lease_owner == lease.token,
            )
            .values(
                state=result.state,
                attempts=JobRow.attempts + 1,
                lease_owner=None,
                lease_expires_at=None,
                last_status=result.dimse_status,
                last_error=result.error,
                next_attempt_at=result.next_attempt_at or now,
                updated_at=now,
            )
        ).rowcount
        if not changed:
            return None
        destination_id = connection.execute(
            select(JobRow.destination_id).where(JobRow.id == lease.job_id)
        ).scalar_one()
        connection.execute(
            AttemptRow.__table__.insert().values(  # type: ignore[attr-defined]
                job_id=lease.job_id,
                destination_id=destination_id,
                started_at=result.started_at,
                duration_ms=result.duration_ms,
                outcome=result.outcome,
                dimse_status=result.dimse_status,
                error=result.error,
            )
        )
        if result.state is JobState.DONE:
            return self._mark_instance_done(connection, lease.instance_id)
        return ""

    def _mark_instance_done(self, connection: Connection, instance_id: int) -> str:
        left = connection.execute(
            select(func.count(JobRow.id)).where(
                JobRow.instance_id == instance_id, JobRow.state != JobState.DONE
            )
        ).scalar_one()
        if left:
            return ""
        connection.execute(
            update(InstanceRow)
            .where(InstanceRow.id == instance_id)
            .values(state=InstanceState.DONE)
        )
        name = connection.execute(
            select(InstanceRow.spool_name).where(InstanceRow.id == instance_id)
        ).scalar_one()
        return str(name)

    def extend(self, lease: Lease, lease_seconds: float) -> bool:
        """Heartbeat: push the expiry out while the lease holds."""
        now = self._clock()
        with self._write() as connection:
            return bool(
                connection.execute(
                    update(JobRow)
                    .where(
                        JobRow.id == lease.job_id,
                        JobRow.state == JobState.LEASED,
                        JobRow.lease_owner == lease.token,
                    )
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                ).rowcount
            )

    def release(self, owner: str) -> int:
        """Graceful shutdown: give back an owner's leases without counting a delivery."""
        now = self._clock()
        with self._write() as connection:
            return int(
                connection.execute(
                    update(JobRow)
                    .where(JobRow.state == JobState.LEASED, JobRow.lease_owner.like(f"{owner}:%"))
                    .values(
                        state=JobState.PENDING,
                        lease_owner=None,
                        lease_expires_at=None,
                        deliveries=func.max(JobRow.deliveries - 1, 0)
                        if connection.dialect.name == "sqlite"
                        else func.greatest(JobRow.deliveries - 1, 0),
                        updated_at=now,
                    )
                ).rowcount
            )

    # -- operators ------------------------------------------------------------------------
    def retry_dead(self, job_id: int | None = None, destination: str | None = None) -> int:
        """`queue retry`: dead-lettered jobs become pending with fresh counters."""
        now = self._clock()
        where = [JobRow.state == JobState.DEAD]
        if job_id is not None:
            where.append(JobRow.id == job_id)
        if destination is not None:
            where.append(
                JobRow.destination_id
                == select(DestinationRow.id)
                .where(DestinationRow.name == destination)
                .scalar_subquery()
            )
        with self._write() as connection:
            return int(
                connection.execute(
                    update(JobRow)
                    .where(*where)
                    .values(
                        state=JobState.PENDING,
                        attempts=0,
                        deliveries=0,
                        next_attempt_at=now,
                        last_error=None,
                        updated_at=now,
                    )
                ).rowcount
            )

    def purge(self, state: str, destination: str | None = None) -> int:
        """`queue purge`: delete jobs in a final state (done or dead) with their attempts."""
        if state not in (JobState.DONE, JobState.DEAD):
            raise ValueError("only done or dead jobs can be purged")
        where = [JobRow.state == state]
        if destination is not None:
            where.append(
                JobRow.destination_id
                == select(DestinationRow.id)
                .where(DestinationRow.name == destination)
                .scalar_subquery()
            )
        with self._write() as connection:
            return int(connection.execute(delete(JobRow).where(*where)).rowcount)

    def list_jobs(
        self, state: str | None = None, destination: str | None = None, limit: int = 100
    ) -> list[Job]:
        """`queue list`: the oldest jobs first, optionally of one state and destination."""
        query = (
            select(*_JOB_COLUMNS)
            .join(DestinationRow, DestinationRow.id == JobRow.destination_id)
            .order_by(JobRow.created_at, JobRow.id)
            .limit(limit)
        )
        if state is not None:
            query = query.where(JobRow.state == state)
        if destination is not None:
            query = query.where(DestinationRow.name == destination)
        with self._engine.connect() as connection:
            return [Job(*row) for row in connection.execute(query)]

    def get_job(self, job_id: int) -> Job | None:
        with self._engine.connect() as connection:
            row = connection.execute(
                select(*_JOB_COLUMNS)
                .join(DestinationRow, DestinationRow.id == JobRow.destination_id)
                .where(JobRow.id == job_id)
            ).one_or_none()
            if row is None:
                return None
            history = tuple(
                Attempt(*a)
                for a in connection.execute(
                    select(
                        AttemptRow.started_at,
                        AttemptRow.duration_ms,
                        AttemptRow.outcome,
                        AttemptRow.dimse_status,
                        AttemptRow.error,
                    )
                    .where(AttemptRow.job_id == job_id)
                    .order_by(AttemptRow.id)
                )
            )
            return Job(*row, history=history)
