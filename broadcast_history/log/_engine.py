"""Async engines for the supported databases, with the settings the log relies on."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

try:  # SQLAlchemy 2.1 names it await_ (await_only is its deprecated alias); 2.0 has
    # only await_only.
    from sqlalchemy.util.concurrency import await_ as _await
except ImportError:  # pragma: no cover
    from sqlalchemy.util.concurrency import await_only as _await

from .._errors import InvalidArgument, LogUnavailable
from .._redact import redacted

#: Default log: an in-memory SQLite database private to one EventLog.
MEMORY_URL = "sqlite+aiosqlite://"
#: Execution option of a connection that will write: SQLite then takes its write
#: lock when the transaction begins (BEGIN IMMEDIATE).
WRITE = {"bh_write": True}

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",
    "mysql+asyncmy": "mysql+asyncmy",
    "mariadb": "mysql+asyncmy",
    "mariadb+asyncmy": "mysql+asyncmy",
}


def normalize_url(url: str | URL) -> URL:
    """Map plain ``sqlite://``, ``postgresql://`` and ``mysql://`` URLs onto their
    async drivers (MySQL connections always talk utf8mb4)."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError, sometimes ValueError
        raise InvalidArgument(f"Not a database URL: {redacted(str(url))!r}") from exc
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise InvalidArgument(
            f"Unsupported log database {parsed.drivername!r}: "
            "use sqlite+aiosqlite://, postgresql+asyncpg:// or mysql+asyncmy://"
        )
    if driver == "sqlite+aiosqlite" and (parsed.host or parsed.port):
        # sqlite+aiosqlite://events.db: the file name read as a host, the database
        # left empty (in memory), which SQLAlchemy refused at connect, in words about
        # the URL the store made of it.
        raise InvalidArgument(
            f"a SQLite URL names no host: {url!s} reads {parsed.host!r} as one; for a "
            "file use three slashes (sqlite+aiosqlite:///events.db) or four for an "
            "absolute path (sqlite+aiosqlite:////var/lib/app/events.db)"
        )
    if parsed.port is not None and not 0 < parsed.port < 65536:
        # The drivers raised OverflowError at connect.
        raise InvalidArgument(f"port {parsed.port} of the log URL is not in 1-65535")
    if driver == "mysql+asyncmy":
        # The client's character set is what str parameters are sent in.
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed.set(drivername=driver)


def is_memory_sqlite(url: URL) -> bool:
    """Whether ``url`` names a private in-memory SQLite database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def is_memory_uri(url: URL) -> bool:
    """Whether ``url`` names an in-memory SQLite database as a URI (``file::memory:``,
    ``file:name?mode=memory``): shared within one process at most."""
    if url.get_backend_name() != "sqlite" or not (url.database or "").startswith("file:"):
        return False
    return url.database == "file::memory:" or url.query.get("mode") == "memory"


def missing_file(url: URL) -> bool:
    """Whether ``url`` is a SQLite file that does not exist (yet)."""
    path = _sqlite_file(url)
    return path is not None and not path.exists()


def require_file(url: URL) -> None:
    """Raise :class:`LogUnavailable` if ``url`` is a SQLite file that does not exist.

    Tools that only read must not create an empty database: a typo in the path
    would look like an empty log.
    """
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise LogUnavailable(
            f"no event log at {path} (nothing was stored there yet; "
            "`broadcast-history db upgrade` creates an empty one)"
        )


def cannot_open(url: URL, exc: BaseException) -> LogUnavailable:
    """The error for a log that failed to open; a SQLite file's says which file."""
    path = _sqlite_file(url)
    where = "" if path is None else f" at {path}"
    # Some errors say nothing by themselves (a TimeoutError has no message); the
    # driver's own says it without SQLAlchemy's link to its error page.
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    detail = str(exc) or type(exc).__name__
    return LogUnavailable(f"cannot open the event log{where}: {detail}")


def _sqlite_file(url: URL) -> Path | None:
    """The absolute path of a SQLite file log (a URL with three slashes names a path
    relative to the working directory); ``None`` for other databases."""
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return None
    return Path(str(url.database)).absolute()


def shared_memory_url(url: URL) -> URL:
    """A uniquely named shared-cache in-memory database, reachable by two engines.

    The writer thread and the async readers need the same in-memory database, which
    a plain ``:memory:`` URL would give each connection privately.
    """
    name = f"file:broadcast-history-{uuid.uuid4().hex}"
    return url.set(database=name, query={"mode": "memory", "cache": "shared", "uri": "true"})


def create_engine(
    url: URL, *, memory: bool = False, sqlite_synchronous: str = "NORMAL", autocommit: bool = False
) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, a busy timeout and explicit BEGINs.

    Args:
        url: A normalized URL (see :func:`normalize_url`).
        memory: ``url`` is an in-memory SQLite database: keep a single connection.
        sqlite_synchronous: ``PRAGMA synchronous`` for file databases.
        autocommit: MySQL only: connections in autocommit mode, set once per
            connection (for lease statements, each atomic by itself, and replay pages).
    """
    if url.get_backend_name() == "mysql":
        # READ COMMITTED as on Postgres: each statement sees what was committed before
        # it, and InnoDB takes no gap locks (fewer deadlocks between appenders). The
        # server closes connections idle for wait_timeout (8 h by default): recycle.
        # With a statement cache, asyncmy runs parameterized statements as prepared
        # ones: values travel in binary, unescaped (a 1 MiB payload goes 8x faster)
        # and MariaDB takes a whole batch of rows in one bulk round trip.
        # In autocommit, closing a connection sends no ROLLBACK (there is nothing to
        # roll back): skip_autocommit_rollback saves that round trip.
        engine = create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
            skip_autocommit_rollback=autocommit,
            pool_recycle=3600,
            pool_reset_on_return=None,  # see _configure_mysql
            connect_args={"stmt_cache_size": 64},
        )
        _configure_mysql(engine.sync_engine)
        return engine
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_size=10, max_overflow=10)
    # One connection kept for an in-memory database: it lives as long as a connection
    # to it is open. (SQLAlchemy chose that pool for a URI's mode=memory by itself,
    # and warns that it will stop.)
    one = memory or is_memory_uri(url)
    kwargs: dict[str, Any] = {"poolclass": StaticPool} if one else {}
    engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)
    _configure_sqlite(engine.sync_engine, memory, sqlite_synchronous)
    return engine


def create_sync_engine(
    url: URL,
    *,
    memory: bool = False,
    sqlite_synchronous: str = "NORMAL",
    single: bool = True,
    checkpoints: bool = True,
) -> Engine:
    """Synchronous engine (the stdlib sqlite3 driver) for the SQLite writer and readers.

    Args:
        url: A normalized SQLite URL.
        memory: ``url`` is a shared in-memory database.
        sqlite_synchronous: ``PRAGMA synchronous`` for file databases.
        single: One connection (the writer), else a small pool (reader threads).
        checkpoints: Commits checkpoint the WAL every ``WAL_CHECKPOINT_PAGES``;
            ``False`` for a writer whose owner checkpoints itself.
    """
    sync_url = url.set(drivername="sqlite")
    kwargs: dict[str, Any] = {"poolclass": StaticPool} if single else {"pool_size": 4}
    if not single and is_memory_uri(url):
        # A connection per reader thread, kept (SQLAlchemy's own choice for a URI's
        # mode=memory, which it warns it will stop making).
        kwargs["poolclass"] = SingletonThreadPool
    engine = sqlalchemy.create_engine(
        sync_url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs
    )
    _configure_sqlite(engine, memory, sqlite_synchronous, checkpoints)
    return engine


# asyncmy's server_status bit saying a transaction is open (from the last OK packet).
_MYSQL_IN_TRANSACTION = 1


class FreshConnections:
    """Pooled connections silent since a read went unanswered are not handed out.

    A server gone silent to this host (a partition, a NAT or a firewall dropping the
    connections) silences every connection opened over that path, not only the one
    a read waited on: each would fail a read after the bound in turn, although new
    connections work. After :meth:`renew`, checking out one whose last answered use
    began before that read did discards it and opens a fresh one in its place (the
    pool's own reconnection); those taken and given back since are kept.

    A connection discarded that way, or because a call on it was cancelled (a read
    past its bound), has its socket closed at once: the pool's graceful close would
    wait for the server's goodbye (asyncpg up to 2 s), which a silent server never
    sends.
    """

    def __init__(self) -> None:
        self._since = float("-inf")

    def watch(self, engine: AsyncEngine) -> None:
        """Apply to ``engine``'s pool."""
        sync = engine.sync_engine
        event.listen(sync, "connect", self._on_connect)
        event.listen(sync, "checkin", self._on_checkin)
        event.listen(sync, "checkout", self._on_checkout)
        event.listen(sync, "invalidate", self._on_invalidate)

    def renew(self, since: float) -> None:
        """A read begun at ``since`` (``time.monotonic()``) got no answer: connections
        whose last use began before then are not checked out again."""
        self._since = max(self._since, since)

    def _on_connect(self, _dbapi_connection: Any, record: Any) -> None:
        record.info["bh_seen"] = time.monotonic()

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        # Seen alive when this use began, not when it came back: an answer proves the
        # path worked when its request went out. One sent before the path went silent
        # can still arrive after a read that then waits in vain began (it was on its
        # way), and stamped on its return, that connection passed for fresh.
        if record is not None:
            info = record.info
            info["bh_seen"] = info.pop("bh_out", time.monotonic())

    def _on_checkout(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.get("bh_seen", float("-inf")) <= self._since:
            raise _Stale("silent since a read on its path went unanswered")
        record.info["bh_out"] = time.monotonic()

    def _on_invalidate(self, dbapi_connection: Any, _record: Any, exc: Any) -> None:
        if dbapi_connection is not None and isinstance(exc, (_Stale, asyncio.CancelledError)):
            close_socket(dbapi_connection.driver_connection)


class _Stale(DisconnectionError):
    """A pooled connection opened before the log last went silent."""


def close_socket(driver: Any) -> None:
    """Close a driver connection's socket without a goodbye: asyncpg's
    ``terminate()``, asyncmy's (synchronous) ``close()``."""
    terminate = getattr(driver, "terminate", None)
    if terminate is not None:
        terminate()
    else:
        driver.close()


def _configure_mysql(engine: Engine) -> None:
    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # A connection the server closed (KILL, a restart, wait_timeout) would be
        # handed out once more and fail that query. asyncmy notices a closed socket
        # as it happens, so checking costs no round trip (unlike pool_pre_ping).
        driver = dbapi_connection.driver_connection
        if not driver.connected or getattr(driver, "_stream_broken", False):
            raise DisconnectionError("connection closed by the server")

    @event.listens_for(engine, "reset")
    def _on_reset(dbapi_connection: Any, _record: Any, state: Any) -> None:
        # SQLAlchemy's own reset sends a ROLLBACK on every return to the pool, even
        # after a COMMIT: one more round trip per append or read. The server says
        # whether a transaction is still open; roll back only then.
        driver = dbapi_connection.driver_connection
        if state.asyncio_safe and driver.server_status & _MYSQL_IN_TRANSACTION:
            dbapi_connection.rollback()


#: WAL pages between automatic checkpoints (SQLite's default is 1,000). A commit over
#: many channels dirties an index page per channel; checkpointing less often writes
#: each hot page to the database file once for many commits. The WAL file grows to
#: about this many pages (8 MiB of 2 KiB pages), plus what commits add while it is
#: copied (at most as many again), before it starts over.
WAL_CHECKPOINT_PAGES = 4000


#: Bytes the WAL file is cut back to when it starts over (SQLite keeps it whole by
#: default). One transaction writes all it changes to the WAL, so an import or a
#: delete of a million events grows it by hundreds of MB; starting over reuses the
#: file from its beginning, and it kept that size until the last connection closed.
#: Above what commits alone reach (about twice ``WAL_CHECKPOINT_PAGES``, 16 MiB), so
#: the WAL is cut only after such a transaction.
WAL_SIZE_LIMIT = 32 * 1024 * 1024


#: Page size of a new SQLite file (SQLite's default is 4,096). A commit writes every
#: page it dirtied to the WAL, and over many channels that is one leaf per channel
#: per index, however few rows each got: half-size pages halve those bytes. Reads
#: lose little (rows here are small). Only a file still empty takes it; an existing
#: file keeps its size (``VACUUM`` in rollback-journal mode would change it).
PAGE_SIZE = 2048


#: How long a new connection keeps retrying its first statements on a locked file.
OPEN_LOCKED_SECONDS = 30.0


def _first_statements(cursor: Any, locked: type[Exception], on_loop: bool) -> None:
    """Page size and WAL, retried while the file is locked.

    A connection's first statement reads the WAL index, and SQLite answers
    "database is locked" at once, without the busy handler, while another process
    holds the file for a moment: the last connection closing (it checkpoints and
    removes the WAL), the first one creating it, or one recovering after a crash.
    Processes starting and stopping together on one file hit that window.
    """
    deadline = time.monotonic() + OPEN_LOCKED_SECONDS
    pause = 0.002
    while True:
        try:
            # Before WAL: a database in WAL mode can no longer change its page size.
            cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except locked as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        if on_loop:
            # aiosqlite's connection: this runs on the event loop (in SQLAlchemy's
            # greenlet), so wait there rather than block the loop.
            _await(asyncio.sleep(pause))
        else:
            time.sleep(pause)  # a thread of our own
        pause = min(pause * 2, 0.1)


def _configure_sqlite(
    engine: Engine, memory: bool, synchronous: str, checkpoints: bool = True
) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE can be used.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            on_loop = not isinstance(dbapi_connection, sqlite3.Connection)
            _first_statements(cursor, engine.dialect.loaded_dbapi.OperationalError, on_loop)
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            pages = WAL_CHECKPOINT_PAGES if checkpoints else 0
            cursor.execute(f"PRAGMA wal_autocheckpoint={pages}")
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Temporary tables on disk, as most builds have it: an import is staged in
            # one (see SqliteStore.restore), and must not be held in memory.
            cursor.execute("PRAGMA temp_store=FILE")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the lock up front: a deferred transaction that later needs to
        # write can fail with SQLITE_BUSY instead of waiting for its turn.
        immediate = conn.get_execution_options().get("bh_write", False)  # see WRITE
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
