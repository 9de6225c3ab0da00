"""Log identity and durable consumer positions.

``broadcast_log`` holds one row: a random id made when the schema is created. Every
envelope on the live transport carries it, so processes whose logs differ but whose
transport is shared ignore each other's events instead of mixing offsets.
``broadcast_consumers`` keeps the position of each named consumer of a channel and
the lease of the process holding it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import secrets
import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _name() -> sa.types.TypeEngine[str]:
    # Bytes on MySQL and MariaDB, as the names of 0001.
    return sa.String(255).with_variant(sa.VARBINARY(1020), "mysql", "mariadb")


def upgrade() -> None:
    log = op.create_table(
        "broadcast_log",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(log, [{"id": secrets.token_hex(8), "created_at": time.time_ns() // 1000}])
    op.create_table(
        "broadcast_consumers",
        sa.Column("channel", _name(), nullable=False),
        sa.Column("name", _name(), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("lease_expires", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("channel", "name", name="pk_broadcast_consumers"),
    )


def downgrade() -> None:
    op.drop_table("broadcast_consumers")
    op.drop_table("broadcast_log")
