"""Operations per source (catalogue SEC-05).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

- ``sources.operations``: what a known source may do once associated, a JSON list out
  of "echo" (C-ECHO, the Verification SOP Class) and "store" (C-STORE). Sources made
  before the upgrade could do both, and keep both.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sources") as batch:
        batch.add_column(sa.Column("operations", sa.JSON(), nullable=True))
    op.execute("""UPDATE sources SET operations = '["echo", "store"]'""")
    with op.batch_alter_table("sources") as batch:
        batch.alter_column("operations", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("sources") as batch:
        batch.drop_column("operations")
