"""A consumer's position may be empty until its first commit.

A holder's lease lives in the consumer's row, which must exist before anything was
committed; until then the row has no epoch, position or update time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("epoch", "position", "updated_at")


def upgrade() -> None:
    # Batch mode: SQLite changes a column by copying the table.
    with op.batch_alter_table("broadcast_consumers") as table:
        for column in _COLUMNS:
            table.alter_column(column, existing_type=sa.BigInteger, nullable=True)


def downgrade() -> None:
    op.execute(
        "DELETE FROM broadcast_consumers WHERE epoch IS NULL OR position IS NULL"
        " OR updated_at IS NULL"
    )
    with op.batch_alter_table("broadcast_consumers") as table:
        for column in _COLUMNS:
            table.alter_column(column, existing_type=sa.BigInteger, nullable=False)
