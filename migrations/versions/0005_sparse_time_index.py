"""The time index holds every 64th event of a channel only.

"First event at or after a time" seeks the newest indexed event before it and reads
on along the primary key (timestamps never decrease along a channel's offsets). A
full index cost every append an entry, and a commit over many channels a dirty index
page per channel. SQLite and Postgres index every 64th offset; MySQL has no partial
indexes and is left as it is.

Building the new index reads the whole events table once; appends wait meanwhile
(see docs/deployment.md for the time it takes).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broadcast_history.log._migrate import swap_in_index

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEX = "ix_broadcast_events_time"
_TABLE = "broadcast_events"
_COLUMNS = ["channel", "timestamp", "offset"]
# Literal, as the queries repeat it: a partial index serves only a query that does.
_SPARSE = sa.text('"offset" % 64 = 0')


def _rebuild(*, sparse: bool) -> None:
    dialect = op.get_bind().dialect.name
    where = _SPARSE if sparse else None
    if dialect == "postgresql":
        # Build first, then swap (DROP INDEX blocks reads until the commit).
        op.create_index(f"{_INDEX}_new", _TABLE, _COLUMNS, postgresql_where=where)
        swap_in_index(op, _INDEX, _TABLE)  # tries that wait little for the table
    elif dialect == "sqlite":
        op.drop_index(_INDEX, table_name=_TABLE)
        op.create_index(_INDEX, _TABLE, _COLUMNS, sqlite_where=where)


def upgrade() -> None:
    _rebuild(sparse=True)


def downgrade() -> None:
    _rebuild(sparse=False)
