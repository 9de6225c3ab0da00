"""The durable event log (SQLAlchemy Core over SQLite, Postgres or MySQL/MariaDB).

:class:`EventLog` is the only way into the log's tables: its lifecycle, reads,
pages, stats, trimming, retention, deletion and import, and durable consumers'
positions and leases. The Alembic environment
(``migrations/env.py``) uses :func:`migration_engine`, :data:`metadata` and
:data:`VERSION_TABLE`; tools use :func:`schema_revision`, :func:`head_revision` and
:func:`known_revision`; an import given a fresh epoch, :func:`new_epoch` (below
:data:`EPOCH_LIMIT`).
"""

from sqlalchemy.ext.asyncio import AsyncEngine

from ._engine import create_engine, normalize_url
from ._info import (
    ChannelInfo,
    ConsumerInfo,
    ConsumerLags,
    LeaseAttempt,
    LeaseClaims,
    LogTotals,
    Pending,
    Retention,
    RetentionPass,
)
from ._log import EventLog
from ._migrate import head_revision, known_revision, schema_revision
from ._rows import EPOCH_LIMIT, new_epoch
from ._schema import VERSION_TABLE, metadata


def migration_engine(url: str) -> AsyncEngine:
    """An engine on the log database at ``url``, set up as the log sets up its own
    (explicit transactions on SQLite), for the Alembic command line."""
    return create_engine(normalize_url(url))


__all__ = [
    "EPOCH_LIMIT",
    "VERSION_TABLE",
    "ChannelInfo",
    "ConsumerInfo",
    "ConsumerLags",
    "EventLog",
    "LeaseAttempt",
    "LeaseClaims",
    "LogTotals",
    "Pending",
    "Retention",
    "RetentionPass",
    "head_revision",
    "known_revision",
    "metadata",
    "migration_engine",
    "new_epoch",
    "schema_revision",
]
