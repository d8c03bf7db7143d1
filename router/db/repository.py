"""``Repository``: the one small API every process uses to reach the database.

Each method is synchronous (the listener calls it from a thread) and runs in one
transaction; writes begin with ``BEGIN IMMEDIATE`` on SQLite (see ``engine.py``). What
comes out is frozen values (``Destination``, ``Source``, ``Instance``, ``rules.RuleSpec``
...), never ORM objects. Errors are typed: ``NotFound``, ``AlreadyExists``, ``InUse`` and
``InvalidValue``, all ``RepositoryError``, each with a message fit for the command line.

``rules_version()`` is bumped in the same transaction as every change to rules,
destinations or sources, so a process that sees the same number has the same
configuration.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from router.db.engine import WRITE_OPTION, make_session_factory
from router.db.models import (
    LIVE_JOB_STATES,
    SOURCE_OPERATIONS,
    DestinationRow,
    InstanceRow,
    InstanceState,
    JobRow,
    JobState,
    NodeStateRow,
    RuleDestinationRow,
    RuleRow,
    SourceRow,
    UserRow,
    utcnow,
)
from router.rules import RuleSpec, parse_condition
from router.users import Secret, StoredUser, check_username

__all__ = [
    "AlreadyExists",
    "Destination",
    "InUse",
    "Instance",
    "InstanceResult",
    "InvalidValue",
    "NewInstance",
    "NotFound",
    "Repository",
    "RepositoryError",
    "Source",
    "TlsOptions",
    "User",
]


class RepositoryError(Exception):
    """A request the database refused; the message names what and why."""


class NotFound(RepositoryError, LookupError):
    pass


class AlreadyExists(RepositoryError):
    pass


class InUse(RepositoryError):
    pass


class InvalidValue(RepositoryError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS towards a destination; paths of PEM files (None: the system's CAs / no
    client certificate)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    id: int
    name: str
    ae_title: str
    host: str
    port: int
    max_associations: int
    max_retries: int
    tls: TlsOptions | None
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class User:
    name: str
    has_passcode: bool
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Source:
    ae_title: str
    addresses: tuple[str, ...]  # IP addresses and CIDR blocks; empty: any address
    created_at: dt.datetime
    operations: tuple[str, ...] = SOURCE_OPERATIONS  # what it may do (SEC-05)


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance in the spool, to be recorded with a job per destination."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_instance_uid: str | None
    calling_aet: str
    called_aet: str
    peer_address: str
    spool_name: str
    size: int
    digest: str  # sha256 of the stored bytes, hex
    destinations: tuple[str, ...]
    unrouted: bool  # no rule matched: kept without jobs (then destinations is empty)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """What ``record_instances`` did with one ``NewInstance``.

    ``duplicate_of`` is set when the same bytes (SOP Instance UID and digest) are
    already recorded with live jobs for exactly the same destinations (or, for an
    unrouted instance, already kept as unrouted): no row and no job was made, and
    ``instance_id``/``job_ids`` are the earlier instance's. The caller must then delete
    the new spool file: the earlier copy is the one the jobs will send.
    """

    instance_id: int
    job_ids: tuple[int, ...]
    duplicate_of: int | None
    new_jobs: bool


@dataclass(frozen=True, slots=True)
class Instance:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_instance_uid: str | None
    calling_aet: str
    called_aet: str
    peer_address: str
    spool_name: str
    size: int
    digest: str
    state: InstanceState
    received_at: dt.datetime


class Repository:
    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.engine = engine
        self._clock = clock
        self._read_sessions = make_session_factory(engine)
        self._write_sessions = make_session_factory(engine, write=True)
        # The ingest path uses a bare Core connection: no ORM session per instance.
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_sessions.begin() as session:
            yield session

    # -- destinations ------------------------------------------------------------------
    def add_destination(
        self,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        max_associations: int = 2,
        max_retries: int = 10,
        tls: TlsOptions | None = None,
    ) -> Destination:
        _check_name(name, "destination")
        if not 1 <= port <= 65535:
            raise InvalidValue(f"invalid port {port}: 1-65535")
        if max_associations < 1 or max_retries < 0:
            raise InvalidValue("max_associations must be at least 1 and max_retries not negative")
        row = DestinationRow(
            name=name,
            ae_title=ae_title,
            host=host,
            port=port,
            max_associations=max_associations,
            max_retries=max_retries,
            tls=tls is not None,
            tls_ca=tls.ca if tls else None,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
            created_at=self._clock(),
        )
        with self._write() as session:
            if session.scalar(select(DestinationRow.id).where(DestinationRow.name == name)):
                raise AlreadyExists(f"destination {name!r} already exists")
            _insert(session, row, f"destination {name!r} already exists")
            _bump_version(session)
            return _destination(row)

    def list_destinations(self) -> list[Destination]:
        with self._read() as session:
            rows = session.scalars(select(DestinationRow).order_by(DestinationRow.name))
            return [_destination(row) for row in rows]

    def get_destination(self, name: str) -> Destination:
        with self._read() as session:
            return _destination(_get_destination(session, name))

    def remove_destination(self, name: str) -> None:
        """Remove a destination; refused (``InUse``) while a rule sends to it or any of
        its jobs is not done (dead jobs too: retry or purge them first). Its finished
        jobs and their attempts go with it."""
        with self._write() as session:
            row = _get_destination(session, name)
            rules = session.scalars(
                select(RuleRow.name)
                .join(RuleDestinationRow, RuleDestinationRow.rule_id == RuleRow.id)
                .where(RuleDestinationRow.destination_id == row.id)
                .order_by(RuleRow.name)
            ).all()
            if rules:
                raise InUse(f"destination {name!r} is used by rule(s): {', '.join(rules)}")
            unfinished = session.scalar(
                select(func.count(JobRow.id)).where(
                    JobRow.destination_id == row.id, JobRow.state != JobState.DONE
                )
            )
            if unfinished:
                raise InUse(
                    f"destination {name!r} has {unfinished} unfinished or dead job(s): "
                    "let them finish, retry or purge them first"
                )
            try:
                session.execute(delete(DestinationRow).where(DestinationRow.id == row.id))
            except IntegrityError as exc:  # a rule or job made meanwhile (PostgreSQL)
                raise InUse(f"destination {name!r} is in use") from exc
            _bump_version(session)

    # -- rules -------------------------------------------------------------------------
    def add_rule(self, spec: RuleSpec) -> RuleSpec:
        """Store a rule; its destinations must exist (``NotFound`` before any write)."""
        _check_name(spec.name, "rule")
        targets = tuple(dict.fromkeys(spec.destinations))
        texts = [condition.text for condition in spec.conditions]  # canonical forms
        now = self._clock()
        with self._write() as session:
            if session.scalar(select(RuleRow.id).where(RuleRow.name == spec.name)):
                raise AlreadyExists(f"rule {spec.name!r} already exists")
            ids = _destination_ids(session, targets)
            row = RuleRow(
                name=spec.name,
                priority=spec.priority,
                enabled=spec.enabled,
                stop=spec.stop,
                conditions=texts,
                created_at=now,
                updated_at=now,
                targets=[
                    RuleDestinationRow(destination_id=ids[target], position=position)
                    for position, target in enumerate(targets)
                ],
            )
            _insert(session, row, f"rule {spec.name!r} already exists")
            _bump_version(session)
        return _rule_spec(row, targets)

    def list_rules(self) -> list[RuleSpec]:
        """Every rule, in evaluation order (priority, then name)."""
        with self._read() as session:
            rows = session.scalars(
                select(RuleRow)
                .options(selectinload(RuleRow.targets))
                .order_by(RuleRow.priority, RuleRow.name)
            )
            return [_rule_spec(row) for row in rows]

    def get_rule(self, name: str) -> RuleSpec:
        with self._read() as session:
            return _rule_spec(_get_rule(session, name))

    def remove_rule(self, name: str) -> None:
        with self._write() as session:
            row = _get_rule(session, name)
            session.execute(delete(RuleRow).where(RuleRow.id == row.id))
            _bump_version(session)

    def set_rule_enabled(self, name: str, enabled: bool) -> None:
        with self._write() as session:
            row = _get_rule(session, name)
            row.enabled = enabled
            row.updated_at = self._clock()
            _bump_version(session)

    def rules_version(self) -> int:
        with self._read() as session:
            version = session.scalar(select(NodeStateRow.rules_version).where(NodeStateRow.id == 1))
            return version or 0

    # -- sources -----------------------------------------------------------------------
    def add_source(
        self,
        ae_title: str,
        addresses: Sequence[str] = (),
        operations: Iterable[str] = SOURCE_OPERATIONS,
    ) -> Source:
        if not ae_title.strip() or len(ae_title) > 16:
            raise InvalidValue(f"invalid AE title {ae_title!r}: 1-16 characters")
        for address in addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError as exc:
                raise InvalidValue(f"invalid address {address!r}: {exc}") from exc
        allowed = _operations(operations)
        row = SourceRow(
            ae_title=ae_title,
            addresses=list(addresses),
            operations=list(allowed),
            created_at=self._clock(),
        )
        with self._write() as session:
            if session.scalar(select(SourceRow.id).where(SourceRow.ae_title == ae_title)):
                raise AlreadyExists(f"source {ae_title!r} already exists")
            _insert(session, row, f"source {ae_title!r} already exists")
            _bump_version(session)
            return _source(row)

    def set_source_operations(self, ae_title: str, operations: Iterable[str]) -> Source:
        """What a known source may do from its next association on."""
        allowed = _operations(operations)
        with self._write() as session:
            row = session.scalar(select(SourceRow).where(SourceRow.ae_title == ae_title))
            if row is None:
                raise NotFound(f"no source {ae_title!r}")
            row.operations = list(allowed)
            _bump_version(session)
            return _source(row)

    def list_sources(self) -> list[Source]:
        with self._read() as session:
            rows = session.scalars(select(SourceRow).order_by(SourceRow.ae_title))
            return [_source(row) for row in rows]

    def remove_source(self, ae_title: str) -> None:
        with self._write() as session:
            deleted = session.execute(delete(SourceRow).where(SourceRow.ae_title == ae_title))
            if not deleted.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no source {ae_title!r}")
            _bump_version(session)

    # -- users (router/users.py hashes; only digests are stored) -------------------------
    def add_user(self, name: str, secret: Secret | None) -> User:
        try:
            check_username(name)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
        row = UserRow(
            name=name,
            salt=secret.salt if secret else None,
            digest=secret.digest if secret else None,
            params=secret.params if secret else None,
            created_at=self._clock(),
        )
        with self._write() as session:
            if session.scalar(select(UserRow.id).where(UserRow.name == name)):
                raise AlreadyExists(f"user {name!r} already exists")
            _insert(session, row, f"user {name!r} already exists")
            return _user(row)

    def list_users(self) -> list[User]:
        with self._read() as session:
            return [_user(row) for row in session.scalars(select(UserRow).order_by(UserRow.name))]

    def user_secrets(self) -> dict[str, StoredUser]:
        """Every user with what is kept of their passcode (the listener's check)."""
        with self._read() as session:
            return {row.name: _stored_user(row) for row in session.scalars(select(UserRow))}

    def remove_user(self, name: str) -> None:
        with self._write() as session:
            deleted = session.execute(delete(UserRow).where(UserRow.name == name))
            if not deleted.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no user {name!r}")

    # -- ingest ------------------------------------------------------------------------
    def record_instances(self, batch: Sequence[NewInstance]) -> list[InstanceResult]:
        """Record a batch of spooled instances and their jobs in ONE transaction.

        Either every instance of the batch is recorded or none is (group commit: the
        listener answers each C-STORE only after this returns). An unknown destination
        (a rule changed meanwhile) raises ``NotFound`` before anything is written. The
        duplicate rule of DESIGN §3.1 is described at ``InstanceResult``; an instance
        that repeats an earlier one of the same batch counts as a duplicate too.
        """
        if not batch:
            return []
        for item in batch:
            _check_new_instance(item)
        now = self._clock()
        with self._write_engine.begin() as connection:
            names = {name for item in batch for name in item.destinations}
            ids = _destination_ids(connection, names)
            return [_record_one(connection, item, ids, now) for item in batch]

    def spool_names(self) -> set[str]:
        """The spool file names of every recorded instance (start-up recovery)."""
        with self._read() as session:
            return set(session.scalars(select(InstanceRow.spool_name)))

    def get_instance(self, instance_id: int) -> Instance:
        with self._read() as session:
            row = session.get(InstanceRow, instance_id)
            if row is None:
                raise NotFound(f"no instance {instance_id}")
            return _instance(row)

    def study_uids(self, instance_ids: Iterable[int]) -> dict[int, str | None]:
        """Instance id -> Study Instance UID, for the ids that exist (audit records)."""
        ids = set(instance_ids)
        if not ids:
            return {}
        with self._read() as session:
            rows = session.execute(
                select(InstanceRow.id, InstanceRow.study_instance_uid).where(
                    InstanceRow.id.in_(ids)
                )
            )
            return {instance_id: study for instance_id, study in rows}

    def list_instances(self, limit: int = 100) -> list[Instance]:
        """The most recently received instances, newest first."""
        with self._read() as session:
            rows = session.scalars(select(InstanceRow).order_by(InstanceRow.id.desc()).limit(limit))
            return [_instance(row) for row in rows]

    # -- queue -------------------------------------------------------------------------
    def instance_counts(self) -> dict[str, int]:
        """Instances per state (routed, unrouted, done): unrouted ones need a person."""
        with self._read() as session:
            rows = session.execute(
                select(InstanceRow.state, func.count(InstanceRow.id)).group_by(InstanceRow.state)
            )
            return {str(state): count for state, count in rows}


# -- helpers (inside one session) ---------------------------------------------------------
def _check_name(name: str, what: str) -> None:
    if not name or len(name) > 64:
        raise InvalidValue(f"invalid {what} name {name!r}: 1-64 characters")


def _insert(session: Session, row: object, duplicate: str) -> None:
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent insert of the same name (PostgreSQL)
        raise AlreadyExists(duplicate) from exc


def _bump_version(session: Session) -> None:
    bumped = session.execute(
        update(NodeStateRow)
        .where(NodeStateRow.id == 1)
        .values(rules_version=NodeStateRow.rules_version + 1)
    )
    if not bumped.rowcount:  # type: ignore[attr-defined]
        session.add(NodeStateRow(id=1, rules_version=1))


def _get_destination(session: Session, name: str) -> DestinationRow:
    row = session.scalar(select(DestinationRow).where(DestinationRow.name == name))
    if row is None:
        raise NotFound(f"no destination {name!r}")
    return row


def _get_rule(session: Session, name: str) -> RuleRow:
    row = session.scalar(
        select(RuleRow).options(selectinload(RuleRow.targets)).where(RuleRow.name == name)
    )
    if row is None:
        raise NotFound(f"no rule {name!r}")
    return row


def _destination_ids(session: Session | Connection, names: Iterable[str]) -> dict[str, int]:
    wanted = set(names)
    if not wanted:
        return {}
    rows = session.execute(_DESTINATION_IDS, {"names": sorted(wanted)})
    ids = {name: id_ for name, id_ in rows}
    missing = sorted(wanted - ids.keys())
    if missing:
        raise NotFound(f"no destination {', '.join(repr(m) for m in missing)}")
    return ids


def _check_new_instance(item: NewInstance) -> None:
    if item.unrouted and item.destinations:
        raise InvalidValue(f"instance {item.spool_name}: unrouted but with destinations")
    if not item.unrouted and not item.destinations:
        raise InvalidValue(f"instance {item.spool_name}: no destination and not unrouted")


def _record_one(
    session: Connection, item: NewInstance, ids: dict[str, int], now: dt.datetime
) -> InstanceResult:
    targets = tuple(dict.fromkeys(item.destinations))
    duplicate = _find_duplicate(session, item, {ids[t] for t in targets})
    if duplicate is not None:
        return duplicate
    # Core inserts, not the ORM unit of work: this runs once per received instance, and
    # the ORM's bookkeeping would cost more than the commit itself.
    try:
        instance_id = session.execute(
            _INSERT_INSTANCE,
            {
                "sop_instance_uid": item.sop_instance_uid,
                "sop_class_uid": item.sop_class_uid,
                "transfer_syntax": item.transfer_syntax,
                "study_instance_uid": item.study_instance_uid,
                "calling_aet": item.calling_aet,
                "called_aet": item.called_aet,
                "peer_address": item.peer_address,
                "spool_name": item.spool_name,
                "size": item.size,
                "digest": item.digest,
                "state": InstanceState.UNROUTED if item.unrouted else InstanceState.ROUTED,
                "received_at": now,
            },
        ).scalar_one()
    except IntegrityError as exc:
        raise AlreadyExists(f"spool file {item.spool_name!r} is already recorded") from exc
    job_ids: tuple[int, ...] = ()
    if targets:
        job_ids = tuple(
            session.execute(
                _INSERT_JOBS,
                [
                    {
                        "instance_id": instance_id,
                        "destination_id": ids[target],
                        "state": JobState.PENDING,
                        "priority": item.priority,
                        "attempts": 0,
                        "deliveries": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for target in targets
                ],
            ).scalars()
        )
    return InstanceResult(instance_id, job_ids, None, bool(job_ids))


# Built once: statement construction is a large share of a small insert's cost.
_INSTANCES: Table = InstanceRow.__table__  # type: ignore[assignment]
_JOBS: Table = JobRow.__table__  # type: ignore[assignment]
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_INSERT_JOBS = insert(_JOBS).returning(_JOBS.c.id, sort_by_parameter_order=True)
_DESTINATION_IDS = select(DestinationRow.name, DestinationRow.id).where(
    DestinationRow.name.in_(bindparam("names", expanding=True))
)
_LIVE_JOBS = (
    select(JobRow.id, JobRow.destination_id)
    .where(JobRow.instance_id == bindparam("instance"), JobRow.state.in_(LIVE_JOB_STATES))
    .order_by(JobRow.id)
)
_DUPLICATE_CANDIDATES = (
    select(InstanceRow.id, InstanceRow.state)
    .where(
        InstanceRow.sop_instance_uid == bindparam("uid"),
        InstanceRow.digest == bindparam("digest"),
    )
    .order_by(InstanceRow.id.desc())
)


def _find_duplicate(
    session: Connection, item: NewInstance, destination_ids: set[int]
) -> InstanceResult | None:
    candidates = session.execute(
        _DUPLICATE_CANDIDATES, {"uid": item.sop_instance_uid, "digest": item.digest}
    ).all()
    for instance_id, state in candidates:
        if item.unrouted:
            if state == InstanceState.UNROUTED:
                return InstanceResult(instance_id, (), instance_id, False)
            continue
        live = session.execute(_LIVE_JOBS, {"instance": instance_id}).all()
        if live and {destination for _, destination in live} == destination_ids:
            return InstanceResult(instance_id, tuple(job for job, _ in live), instance_id, False)
    return None


# -- rows to values -----------------------------------------------------------------------
def _destination(row: DestinationRow) -> Destination:
    tls = TlsOptions(row.tls_ca, row.tls_cert, row.tls_key) if row.tls else None
    return Destination(
        row.id,
        row.name,
        row.ae_title,
        row.host,
        row.port,
        row.max_associations,
        row.max_retries,
        tls,
        row.created_at,
    )


def _user(row: UserRow) -> User:
    return User(row.name, row.digest is not None, row.created_at)


def _stored_user(row: UserRow) -> StoredUser:
    has_secret = row.salt is not None and row.digest is not None and row.params is not None
    secret = Secret(row.salt, row.digest, row.params) if has_secret else None  # type: ignore[arg-type]
    return StoredUser(row.name, secret)


def _source(row: SourceRow) -> Source:
    return Source(row.ae_title, tuple(row.addresses), row.created_at, tuple(row.operations))


def _operations(operations: Iterable[str]) -> tuple[str, ...]:
    """A non-empty subset of SOURCE_OPERATIONS, in their canonical order."""
    given = set(operations)
    unknown = sorted(given - set(SOURCE_OPERATIONS))
    if unknown:
        names = ", ".join(SOURCE_OPERATIONS)
        raise InvalidValue(f"unknown operation {unknown[0]!r}: use one or more of {names}")
    if not given:
        raise InvalidValue("a source must be allowed at least one operation")
    return tuple(op for op in SOURCE_OPERATIONS if op in given)


def _instance(row: InstanceRow) -> Instance:
    return Instance(
        row.id,
        row.sop_instance_uid,
        row.sop_class_uid,
        row.transfer_syntax,
        row.study_instance_uid,
        row.calling_aet,
        row.called_aet,
        row.peer_address,
        row.spool_name,
        row.size,
        row.digest,
        InstanceState(row.state),
        row.received_at,
    )


def _rule_spec(row: RuleRow, destinations: tuple[str, ...] | None = None) -> RuleSpec:
    if destinations is None:
        destinations = tuple(target.destination.name for target in row.targets)
    return RuleSpec(
        name=row.name,
        priority=row.priority,
        enabled=row.enabled,
        stop=row.stop,
        conditions=tuple(parse_condition(text) for text in row.conditions),
        destinations=destinations,
    )
