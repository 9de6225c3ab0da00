"""The idempotency-key index holds only events that have a key.

Most events are published without one; indexing them all cost every append an index
entry per event, and a dirty index page per channel per commit. SQLite and Postgres
index the keyed rows only; MySQL has no partial indexes and is left as it is.

Building the new index reads the whole events table once; appends wait meanwhile
(see docs/deployment.md for the time it takes).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broadcast_history.log._migrate import swap_in_index

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
    if dialect == "postgresql":
        # Build the new index first (appends wait, reads go on), then swap: DROP INDEX
        # locks the table against reads too, until the migration commits, so it comes
        # last and lasts only for the rename.
        op.create_index(
            f"{_INDEX}_new", _TABLE, ["channel", "key"], unique=True, postgresql_where=where
        )
        swap_in_index(op, _INDEX, _TABLE)  # tries that wait little for the table
        return
    # SQLite cannot rename an index; its writers wait either way and WAL readers do not.
    op.drop_index(_INDEX, table_name=_TABLE)
    op.create_index(_INDEX, _TABLE, ["channel", "key"], unique=True, sqlite_where=where)


def upgrade() -> None:
    _rebuild(partial=True)


def downgrade() -> None:
    _rebuild(partial=False)
