"""The idempotency-key index holds only events that have a key.

Most events are published without one; indexing them all cost every append an index
entry per event, and a dirty index page per channel per commit. SQLite and Postgres
index the keyed rows only; MySQL has no partial indexes and is left as it is.

Rebuilding the index reads the whole events table once, and on Postgres holds appends
for that long (a transaction of DDL); see docs/migrating.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_INDEX = "ux_broadcast_events_key"
_TABLE = "broadcast_events"
_PARTIAL = ("sqlite", "postgresql")


def _rebuild(*, partial: bool) -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in _PARTIAL:
        return
    where = sa.text("key IS NOT NULL") if partial else None
    op.drop_index(_INDEX, table_name=_TABLE)
    op.create_index(
        _INDEX,
        _TABLE,
        ["channel", "key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def upgrade() -> None:
    _rebuild(partial=True)


def downgrade() -> None:
    _rebuild(partial=False)
