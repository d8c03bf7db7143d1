"""Initial schema: destinations, rules, sources, instances, jobs, attempts, node_state.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Portable on SQLite and PostgreSQL: states are strings with CHECK constraints, timestamps
are ``timestamptz`` (UTC text on SQLite), server defaults are plain SQL on both. Names
of constraints and indexes come from the models' naming convention (``op.f``), so that
later batch migrations on SQLite can find them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids on PostgreSQL; on SQLite only INTEGER PRIMARY KEY auto-increments.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _timestamp(
    name: str, *, nullable: bool = False, default: bool = True
) -> sa.Column[dt.datetime]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        server_default=sa.func.current_timestamp() if default else None,
        nullable=nullable,
    )


def _state(*values: str, name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "destinations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("max_associations", sa.Integer(), server_default=sa.text("2"), nullable=False),
        sa.Column("max_retries", sa.Integer(), server_default=sa.text("10"), nullable=False),
        sa.Column("tls", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("tls_ca", sa.String(length=1024), nullable=True),
        sa.Column("tls_cert", sa.String(length=1024), nullable=True),
        sa.Column("tls_key", sa.String(length=1024), nullable=True),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "max_associations >= 1", name=op.f("ck_destinations_max_associations_positive")
        ),
        sa.CheckConstraint(
            "max_retries >= 0", name=op.f("ck_destinations_max_retries_not_negative")
        ),
        sa.CheckConstraint("port BETWEEN 1 AND 65535", name=op.f("ck_destinations_port_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_destinations")),
        sa.UniqueConstraint("name", name=op.f("uq_destinations_name")),
    )
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("100"), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("stop", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("conditions", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
        sa.UniqueConstraint("name", name=op.f("uq_rules_name")),
    )
    op.create_table(
        "rule_destinations",
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_rule_destinations_destination_id_destinations"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["rules.id"],
            name=op.f("fk_rule_destinations_rule_id_rules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rule_id", "destination_id", name=op.f("pk_rule_destinations")),
    )
    op.create_index(
        op.f("ix_rule_destinations_destination_id"), "rule_destinations", ["destination_id"]
    )
    op.create_table(
        "sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("addresses", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sources")),
        sa.UniqueConstraint("ae_title", name=op.f("uq_sources_ae_title")),
    )
    op.create_table(
        "instances",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("called_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=False),
        sa.Column("spool_name", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column(
            "state", _state("routed", "unrouted", "done", name="instance_state"), nullable=False
        ),
        _timestamp("received_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("spool_name", name=op.f("uq_instances_spool_name")),
    )
    op.create_index(op.f("ix_instances_sop_instance_uid"), "instances", ["sop_instance_uid"])
    op.create_table(
        "jobs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            _state("pending", "leased", "retry_wait", "done", "dead", name="job_state"),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("deliveries", sa.Integer(), server_default=sa.text("0"), nullable=False),
        _timestamp("next_attempt_at"),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        _timestamp("lease_expires_at", nullable=True, default=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_jobs_destination_id_destinations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_jobs_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_instance_id"), "jobs", ["instance_id"])
    op.create_index("ix_jobs_state_next_attempt_at", "jobs", ["state", "next_attempt_at"])
    op.create_index("ix_jobs_destination_id_state", "jobs", ["destination_id", "state"])
    op.create_table(
        "attempts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("job_id", BIG_ID, nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        _timestamp("started_at", default=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("dimse_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_attempts_destination_id_destinations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_attempts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
    )
    op.create_index(op.f("ix_attempts_job_id"), "attempts", ["job_id"])
    op.create_index(op.f("ix_attempts_destination_id"), "attempts", ["destination_id"])
    node_state = op.create_table(
        "node_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("rules_version", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_node_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_state")),
    )
    op.bulk_insert(node_state, [{"id": 1, "rules_version": 0}])


def downgrade() -> None:
    for table in (
        "node_state",
        "attempts",
        "jobs",
        "instances",
        "sources",
        "rule_destinations",
        "rules",
        "destinations",
    ):
        op.drop_table(table)
