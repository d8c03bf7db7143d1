"""Users for User Identity Negotiation (PS3.7 D.3.3.7).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

- ``users``: a name the listener accepts when ``[security] user_identity`` is
  "username" or "password", and for the latter a ``hashlib.scrypt`` digest of the
  passcode with its own random salt and the cost it was made with ("n:r:p"); never the
  passcode itself (router/users.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("salt", sa.LargeBinary(length=64), nullable=True),
        sa.Column("digest", sa.LargeBinary(length=64), nullable=True),
        sa.Column("params", sa.String(length=32), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.current_timestamp(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )


def downgrade() -> None:
    op.drop_table("users")
