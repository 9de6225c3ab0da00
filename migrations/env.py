"""Alembic environment for the broadcast_history event log.

Called two ways: by the library (``Broadcast.connect`` or ``broadcast-history db``),
which hands over an open connection, or by the ``alembic`` command line, which gets
the URL from ``sqlalchemy.url`` or the ``BROADCAST_HISTORY_LOG`` variable.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from broadcast_history.log import VERSION_TABLE, metadata, migration_engine

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("BROADCAST_HISTORY_LOG")
    if not url:
        raise RuntimeError("set sqlalchemy.url or BROADCAST_HISTORY_LOG to the log's URL")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_engine() -> None:
    engine = migration_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=str(migration_engine(_url()).url),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    asyncio.run(_run_with_engine())
