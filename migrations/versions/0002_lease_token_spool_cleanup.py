"""Lease tokens apart from owners; spool clean-up bookkeeping; an index for throughput.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

- ``jobs.lease_token``: the random token of the current lease. Until now the token was
  kept in ``lease_owner`` as ``owner:token``; ``lease_owner`` now holds the owner alone,
  so that ``release(owner)`` is an exact match. Jobs leased when the upgrade runs get
  their whole old ``owner:token`` as token, which is what their workers hold: their
  results are still written (and the leases still expire as before).
- ``instances.done_at`` and ``instances.spool_removed_at``: when an instance's last job
  was done, and when its spool file was removed (``JobQueue.removable_spool_files``,
  ``forget_spool_file``), with an index that finds the files still to remove. Instances
  done before the upgrade count as done when received, their files as not yet removed.
- ``ix_attempts_started_at``: attempts of the last minutes (``queue status``).
- ``ix_jobs_destination_id_state_priority_next_attempt_at`` replaces
  ``ix_jobs_destination_id_state`` (its prefix): ``JobQueue.lease`` reads due jobs per
  destination, state and priority in due order, a few index seeks however long the
  backlog, where one query ordered by priority rank sorted every due job each time.
- ``ix_jobs_state_created_at`` replaces ``ix_jobs_state_next_attempt_at``: the oldest
  job still to do (queue status) reads it; the old one is dropped because SQLite,
  without statistics, preferred walking it through every job of a state to serve
  ``ORDER BY next_attempt_at`` over the range reads above.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_token", sa.String(length=64), nullable=True))
    op.execute("UPDATE jobs SET lease_token = lease_owner WHERE state = 'leased'")
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("done_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("spool_removed_at", sa.DateTime(timezone=True), nullable=True))
    # Instances already done: their files were removed by the worker that finished them
    # (or should have been); listing them once more lets a sweep make sure.
    op.execute("UPDATE instances SET done_at = received_at WHERE state = 'done'")
    op.create_index(
        "ix_instances_state_spool_removed_at_done_at",
        "instances",
        ["state", "spool_removed_at", "done_at"],
    )
    op.create_index("ix_attempts_started_at", "attempts", ["started_at"])
    op.create_index(
        "ix_jobs_destination_id_state_priority_next_attempt_at",
        "jobs",
        ["destination_id", "state", "priority", "next_attempt_at", "id"],
    )
    op.drop_index("ix_jobs_destination_id_state", table_name="jobs")
    op.create_index("ix_jobs_state_created_at", "jobs", ["state", "created_at"])
    op.drop_index("ix_jobs_state_next_attempt_at", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_state_next_attempt_at", "jobs", ["state", "next_attempt_at"])
    op.drop_index("ix_jobs_state_created_at", table_name="jobs")
    op.create_index("ix_jobs_destination_id_state", "jobs", ["destination_id", "state"])
    op.drop_index("ix_jobs_destination_id_state_priority_next_attempt_at", table_name="jobs")
    op.drop_index("ix_attempts_started_at", table_name="attempts")
    op.drop_index("ix_instances_state_spool_removed_at_done_at", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("spool_removed_at")
        batch.drop_column("done_at")
    op.execute("UPDATE jobs SET lease_owner = lease_token WHERE state = 'leased'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_token")
