"""Schema management through the Alembic migrations shipped with the package.

Alembic (with Mako and Pygments behind it) is imported only to migrate or to look at
a revision this version does not know: it was a third of the time ``import
broadcast_history`` took, paid by every process start and CLI command. Starting on
a log already at :data:`HEAD` reads its version table with SQLAlchemy alone.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import LogUnavailable, SchemaOutOfDate
from ._engine import cannot_open, create_engine, normalize_url, require_file
from ._schema import VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest of the shipped migrations (migrations/versions); a test pins it to the
#: head Alembic finds there.
HEAD = "0005"
_PACKAGE = Path(__file__).resolve().parent.parent
# Any constant works: it only has to be the same for every process migrating this log.
_PG_LOCK_ID = 0x6268_6C6F_67
# MySQL's named locks are server-wide: one name per database (at most 64 characters).
_MYSQL_LOCK = "CONCAT('broadcast_history:', MD5(DATABASE()))"
_MYSQL_LOCK_WAIT = 300
#: Seconds a start waits for another process's migration of a Postgres log.
PG_LOCK_WAIT = 300.0
_LOCK_NOT_AVAILABLE = "55P03"  # Postgres: lock_timeout ran out
#: Milliseconds one try at swapping a rebuilt Postgres index in waits for the table,
#: and seconds it then lets others have it before the next.
SWAP_TRY_MS = 500
SWAP_PAUSE = 0.5


def migrations_dir() -> Path:
    """Where the migrations are: inside an installed wheel, else the source checkout."""
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaOutOfDate("the broadcast_history migrations are missing from this install")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped migrations."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """Newest revision of the shipped migrations."""
    return HEAD


def _current(connection: Connection) -> str | None:
    """The revision the database is at (``None``: no schema), as Alembic reads it."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:  # Alembic's branches: never made by the shipped migrations
        raise SchemaOutOfDate(f"event log schema has several heads: {', '.join(sorted(rows))}")
    return rows[0] if rows else None


def known_revision(revision: str | None) -> bool:
    """Whether ``revision`` is one of the shipped migrations (or no schema at all): a
    database at another one was migrated by a newer version."""
    if revision is None or revision == HEAD:
        return True
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    return any(script.revision == revision for script in scripts.walk_revisions())


def _newer(current: str | None) -> SchemaOutOfDate:
    return SchemaOutOfDate(
        f"event log schema is at {current}, which this version of broadcast_history does "
        f"not know (its newest is {head_revision()}): a newer version migrated it; "
        "upgrade broadcast_history here, `db upgrade` cannot go back"
    )


def swap_in_index(op: Any, index: str, table: str) -> None:
    """Replace Postgres index ``index`` of ``table`` with ``{index}_new`` (built by the
    caller); ``op`` is the migration's ``alembic.op``.

    DROP INDEX needs the table to itself: it waits for every transaction using it
    (a long report, a pg_dump) and every later statement on the table waits behind it.
    Each try waits at most SWAP_TRY_MS, then lets reads pass for SWAP_PAUSE, for up to
    PG_LOCK_WAIT in all. (Appends wait throughout: the caller's CREATE INDEX holds a
    SHARE lock until the migration commits.)
    """
    if op.get_context().as_sql:  # writing a SQL script (alembic --sql): no tries to make
        op.drop_index(index, table_name=table)
        op.execute(f"ALTER INDEX {index}_new RENAME TO {index}")
        return
    connection: Connection = op.get_bind()
    deadline = time.monotonic() + PG_LOCK_WAIT
    while True:
        try:
            with connection.begin_nested():
                connection.execute(text(f"SET LOCAL lock_timeout = '{SWAP_TRY_MS}ms'"))
                connection.execute(text(f"DROP INDEX {index}"))
            break
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            if time.monotonic() > deadline:
                raise LogUnavailable(
                    f"the migration could not have the events table to itself for "
                    f"{PG_LOCK_WAIT:.0f} s (long transactions on it): nothing was changed"
                ) from exc
            # On the server: a sleep here would hold the event loop of the migrator.
            connection.execute(text("SELECT pg_sleep(:pause)"), {"pause": SWAP_PAUSE})
    # SET LOCAL outlives the savepoint that succeeded: the rest runs unbounded again.
    connection.execute(text("SET LOCAL lock_timeout = DEFAULT"))
    connection.execute(text(f"ALTER INDEX {index}_new RENAME TO {index}"))


def _upgrade(connection: Connection, create_only: bool = False) -> None:
    # Several hosts starting at once must not create the tables twice.
    if connection.dialect.name == "postgresql":
        # Bounded, as on MySQL: a stalled migrator must not keep every start waiting.
        connection.execute(text(f"SET LOCAL lock_timeout = '{int(PG_LOCK_WAIT * 1000)}ms'"))
        try:
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                raise LogUnavailable(
                    "another process has been migrating the event log for too long"
                ) from exc
            raise
        connection.execute(text("SET LOCAL lock_timeout = DEFAULT"))
    elif connection.dialect.name == "mysql":
        # MySQL's DDL commits as it goes, so the lock is the session's, not the
        # transaction's: released explicitly.
        locked = connection.execute(
            text(f"SELECT GET_LOCK({_MYSQL_LOCK}, :wait)"), {"wait": _MYSQL_LOCK_WAIT}
        ).scalar()
        if locked != 1:
            raise LogUnavailable("another process has been migrating the event log for too long")
        # "Name ... ignored for PRIMARY key" (MySQL names every primary key PRIMARY) is
        # a note on MySQL but a warning on MariaDB, which the driver logs: kept none
        # (max_error_count 0) while the schema is made, not only notes (sql_notes).
        connection.execute(text("SET SESSION sql_notes = 0"))
        connection.execute(text("SET SESSION max_error_count = 0"))
        try:
            _upgrade_unlocked(connection, create_only)
            # Committed before the lock is let go: the last version update comes after
            # the last DDL (which commits by itself), and the next process to take the
            # lock would read the revision before it and migrate again. (The caller's
            # own commit then finds nothing to do; MySQL's DDL commits as it goes
            # anyway.)
            connection.exec_driver_sql("COMMIT")
        except BaseException:
            # The connection may be gone, with its lock and settings: the clean-up's
            # own failure must not hide why.
            with contextlib.suppress(SQLAlchemyError):
                _end_mysql_migration(connection)
            raise
        _end_mysql_migration(connection)
        return
    _upgrade_unlocked(connection, create_only)


def _end_mysql_migration(connection: Connection) -> None:
    """Restore the session's settings and release the migration lock."""
    connection.execute(text("SET SESSION max_error_count = DEFAULT"))
    connection.execute(text("SET SESSION sql_notes = 1"))
    connection.execute(text(f"SELECT RELEASE_LOCK({_MYSQL_LOCK})"))


def _upgrade_unlocked(connection: Connection, create_only: bool) -> None:
    # Read again under the lock: another process may have migrated meanwhile.
    if not _is_head(_current(connection), create_only=create_only):
        from alembic import command

        command.upgrade(alembic_config(connection), "head")


def _is_head(current: str | None, *, create_only: bool) -> bool:
    """Whether ``current`` is the newest revision. Raises :class:`SchemaOutOfDate` for
    one no upgrade here may move: newer than this version knows, or, with
    ``create_only``, any existing older one."""
    if current == head_revision():
        return True
    if not known_revision(current):
        raise _newer(current)
    if create_only and current is not None:
        raise out_of_date(current)
    return False


def out_of_date(current: str | None) -> SchemaOutOfDate:
    """The error for a schema at ``current`` (``None``: none) when migrating is off."""
    where = "has no schema yet" if current is None else f"schema is at {current}"
    return SchemaOutOfDate(
        f"the event log {where}, this version needs {head_revision()}: run "
        "`broadcast-history db upgrade` or connect with migrate=True"
    )


def _check(connection: Connection) -> None:
    current = _current(connection)
    if not _is_head(current, create_only=True):
        raise out_of_date(current)  # no schema at all


async def upgrade(conn: AsyncConnection, *, create_only: bool = False) -> None:
    """Create or upgrade the schema to the newest revision (inside ``conn``'s
    transaction); ``create_only``: raise :class:`SchemaOutOfDate` for an existing
    older schema instead of upgrading it."""
    await conn.run_sync(_upgrade, create_only)


async def is_current(conn: AsyncConnection, *, create_only: bool = False) -> bool:
    """Whether the schema is at the newest revision (nothing to upgrade).

    Raises:
        SchemaOutOfDate: A newer version migrated it: no upgrade can help, so there
            is no migration lock to wait for either. With ``create_only``, also an
            older one (only a database with no schema is to be upgraded).
    """
    current: str | None = await conn.run_sync(_current)
    return _is_head(current, create_only=create_only)


async def check(conn: AsyncConnection) -> None:
    """Raise :class:`SchemaOutOfDate` unless the schema is at the newest revision."""
    await conn.run_sync(_check)


async def schema_revision(url: str | URL) -> str | None:
    """The schema revision the log database at ``url`` is at (``None``: no schema).

    Never creates anything: a SQLite file that does not exist is
    :class:`LogUnavailable`.

    Raises:
        LogUnavailable: The database cannot be reached.
    """
    parsed = normalize_url(url)
    require_file(parsed)
    engine = create_engine(parsed)
    try:
        async with engine.connect() as conn:
            revision: str | None = await conn.run_sync(_current)
            return revision
    except (SQLAlchemyError, OSError) as exc:
        raise cannot_open(parsed, exc) from exc
    finally:
        await engine.dispose()
