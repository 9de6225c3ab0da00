"""Channels and events tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# On MySQL and MariaDB names and keys are bytes (VARBINARY: text collations would fold
# case and ignore trailing spaces) and payloads LONGBLOB (BLOB stops at 64 KiB).
# SQLite and Postgres get VARCHAR(255) and their plain binary type.
_MYSQL = ("mysql", "mariadb")


def _name() -> sa.types.TypeEngine[str]:
    return sa.String(255).with_variant(sa.VARBINARY(1020), *_MYSQL)


def upgrade() -> None:
    op.create_table(
        "broadcast_channels",
        sa.Column("name", _name(), primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("last_offset", sa.BigInteger, nullable=False),
        sa.Column("last_timestamp", sa.BigInteger, nullable=False),
        sa.Column("first_offset", sa.BigInteger, nullable=False),
        sa.Column("trimmed_timestamp", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "broadcast_events",
        sa.Column("channel", _name(), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("timestamp", sa.BigInteger, nullable=False),
        sa.Column("is_text", sa.Boolean, nullable=False),
        sa.Column(
            "payload", sa.LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL), nullable=False
        ),
        sa.Column("key", _name(), nullable=True),
        sa.PrimaryKeyConstraint("channel", "offset", name="pk_broadcast_events"),
    )
    op.create_index(
        "ix_broadcast_events_time", "broadcast_events", ["channel", "timestamp", "offset"]
    )
    op.create_index("ux_broadcast_events_key", "broadcast_events", ["channel", "key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_broadcast_events_key", table_name="broadcast_events")
    op.drop_index("ix_broadcast_events_time", table_name="broadcast_events")
    op.drop_table("broadcast_events")
    op.drop_table("broadcast_channels")
