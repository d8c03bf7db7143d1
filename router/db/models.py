"""SQLAlchemy 2 models: the node's tables (DESIGN §5).

Only ``router/db`` imports this module; everything else sees the frozen values that
``repository.py`` returns. The schema is made by the Alembic migrations alone (no
``create_all``); ``tests/unit/test_migrations.py`` checks that the two agree.

Portability: every type and server default here works on SQLite and PostgreSQL. States
are ``str`` enums stored as strings with a CHECK constraint (not native enum types, so a
new state is a plain migration); timestamps are timezone-aware UTC on both databases.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum, StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    func,
    text,
    true,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names: batch migrations on SQLite can only drop or alter a
# constraint that has a name (Alembic docs, "Integration of Naming Conventions").
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A SOP Instance UID and the other UIDs are at most 64 characters (PS3.5 §9.1), an AE
# title at most 16 (PS3.5 Table 6.2-1, AE).
UID_LENGTH = 64
AE_LENGTH = 16
NAME_LENGTH = 64
PATH_LENGTH = 1024

# SQLite makes only an INTEGER PRIMARY KEY an alias of the rowid (auto-increment);
# PostgreSQL gets a 64-bit identity for the tables that grow without bound.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class InstanceState(StrEnum):
    ROUTED = "routed"  # jobs were made for it
    UNROUTED = "unrouted"  # no rule matched; kept by the unrouted policy
    DONE = "done"  # every job finished; the spool file may go


class JobState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    RETRY_WAIT = "retry_wait"
    DONE = "done"
    DEAD = "dead"


#: Job states in which the job still has work to do.
LIVE_JOB_STATES = (JobState.PENDING, JobState.LEASED, JobState.RETRY_WAIT)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC ``datetime`` on every database.

    PostgreSQL stores ``timestamptz``; SQLite has no time zone, so the value is stored
    as UTC and given its zone back on the way out. A naive datetime is refused: it is a
    bug at the caller, and guessing its zone would corrupt ordering.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _state_type(enum: type[Enum], name: str) -> SAEnum:
    return SAEnum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


def _created() -> Mapped[dt.datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, server_default=func.current_timestamp())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DestinationRow(Base):
    __tablename__ = "destinations"
    __table_args__ = (
        CheckConstraint("port BETWEEN 1 AND 65535", name="port_range"),
        CheckConstraint("max_associations >= 1", name="max_associations_positive"),
        CheckConstraint("max_retries >= 0", name="max_retries_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    ae_title: Mapped[str] = mapped_column(String(AE_LENGTH))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    max_associations: Mapped[int] = mapped_column(Integer, server_default=text("2"))
    max_retries: Mapped[int] = mapped_column(Integer, server_default=text("10"))
    tls: Mapped[bool] = mapped_column(Boolean, server_default=false())
    tls_ca: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    tls_cert: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    tls_key: Mapped[str | None] = mapped_column(String(PATH_LENGTH))
    created_at: Mapped[dt.datetime] = _created()


class RuleRow(Base):
    __tablename__ = "rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("100"))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=true())
    stop: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The canonical texts of the conditions (rules.Condition.text), in order.
    conditions: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _created()

    targets: Mapped[list[RuleDestinationRow]] = relationship(
        order_by="RuleDestinationRow.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class RuleDestinationRow(Base):
    """A rule's destination. The RESTRICT foreign key keeps a destination in use."""

    __tablename__ = "rule_destinations"

    rule_id: Mapped[int] = mapped_column(
        ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True
    )
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
    # The destination's place in the rule's list (the order the rule was written in).
    position: Mapped[int] = mapped_column(Integer)

    destination: Mapped[DestinationRow] = relationship(lazy="joined")


#: Operations a source may be allowed (catalogue SEC-05): C-ECHO (the Verification SOP
#: Class) and C-STORE (any other abstract syntax the listener accepts).
SOURCE_OPERATIONS = ("echo", "store")


class SourceRow(Base):
    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(AE_LENGTH), unique=True)
    # IP addresses and CIDR blocks the source may connect from; empty: any address.
    addresses: Mapped[list[str]] = mapped_column(JSON)
    # What the source may do once associated: a non-empty subset of SOURCE_OPERATIONS.
    operations: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = _created()


class InstanceRow(Base):
    __tablename__ = "instances"
    __table_args__ = (
        # "Which spool files may go?" (jobs.JobQueue.removable_spool_files) and "which
        # routed instances have nothing left to do?" (after a purge).
        Index(
            "ix_instances_state_spool_removed_at_done_at", "state", "spool_removed_at", "done_at"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    calling_aet: Mapped[str] = mapped_column(String(AE_LENGTH))
    called_aet: Mapped[str] = mapped_column(String(AE_LENGTH))
    peer_address: Mapped[str] = mapped_column(String(64))
    # Generated by the router; never derived from peer text (DESIGN §3.1).
    spool_name: Mapped[str] = mapped_column(String(255), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))  # sha256, lower-case hex
    state: Mapped[InstanceState] = mapped_column(_state_type(InstanceState, "instance_state"))
    received_at: Mapped[dt.datetime] = _created()
    # When the last of its jobs was done (state DONE), and when its spool file was
    # removed: a done instance whose file is not yet removed is still to clean up.
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    spool_removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The first: the oldest job still to do (queue status). The second: what is due,
        # which JobQueue.lease reads range by range in due order (DESIGN §3.2), and what
        # is queued for a destination. No index may start (state, next_attempt_at):
        # without statistics SQLite would walk it through every job of a state instead.
        Index("ix_jobs_state_created_at", "state", "created_at"),
        Index(
            "ix_jobs_destination_id_state_priority_next_attempt_at",
            "destination_id",
            "state",
            "priority",
            "next_attempt_at",
            "id",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    # CASCADE: a destination is removed only when none of its jobs is left to do
    # (repository.remove_destination); its finished jobs go with it.
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id", ondelete="CASCADE"))
    state: Mapped[JobState] = mapped_column(_state_type(JobState, "job_state"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    deliveries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[dt.datetime] = _created()
    # Who holds the lease (a worker's or dispatcher's name) and the lease's own random
    # token: a result is written only while the job still carries that token.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _created()

    destination: Mapped[DestinationRow] = relationship()


class AttemptRow(Base):
    __tablename__ = "attempts"
    # Recent throughput (queue status) reads the attempts of the last minutes.
    __table_args__ = (Index("ix_attempts_started_at", "started_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), index=True
    )
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class NodeStateRow(Base):
    """The node's single row of shared counters (id is always 1)."""

    __tablename__ = "node_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # Bumped in the same transaction as every change to rules, destinations or sources,
    # so that every process knows when to reload them.
    rules_version: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class UserRow(Base):
    """A user the listener accepts in User Identity Negotiation (PS3.7 D.3.3.7).

    Only a ``hashlib.scrypt`` digest of the passcode is stored, with its own random salt
    and the cost parameters it was made with (router/users.py); no passcode: the user may
    identify by name alone ([security] user_identity = "username")."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    salt: Mapped[bytes | None] = mapped_column(LargeBinary(64))
    digest: Mapped[bytes | None] = mapped_column(LargeBinary(64))
    # scrypt cost as "n:r:p", so that a later default does not break stored digests.
    params: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = _created()
