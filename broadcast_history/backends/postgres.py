"""Postgres LISTEN/NOTIFY transport (asyncpg), for ``postgres://`` URLs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Sequence
from typing import Any

import asyncpg

from .._cancel import wait_for
from .._errors import NotConnected, TransportError
from .._event import Event
from .._sparse import Sparse
from ._backoff import Backoff
from ._inbox import Inbox, InboxTransport
from .base import BroadcastBackend

logger = logging.getLogger("broadcast_history")

# Errors after which trying again may succeed: the server went away or is starting.
# asyncpg raises InternalClientError ("cannot switch to state ...") for a statement
# on a connection whose backend was terminated meanwhile, as often as 1 in 6 times.
_TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


# Server errors after which another connection may succeed, by SQLSTATE: connection
# exceptions (08; PgBouncer's "server login has been failing" is 08P01), insufficient
# resources (53), operator intervention (57: shutdown, crash, starting up), and a
# read-only transaction (25006: a reconnect that reached a standby during a
# failover). Taken for good, they ended every subscription of the process.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_STATES = ("25006",)
# PgBouncer answers 08P01 for every refusal of its own, lasting ones too (a wrong
# password, a database it does not know): only these say the server may come back.
_PGBOUNCER_PASSING = ("login has been failing", "no more connections", "cannot connect to server")


def _transient(exc: BaseException | None) -> bool:
    """Whether trying again, on a new connection, may succeed."""
    if isinstance(exc, _TRANSIENT):
        return True
    state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    if state == "08P01":
        return any(words in str(exc) for words in _PGBOUNCER_PASSING)
    return isinstance(state, str) and (
        state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    )


def channel_identifier(channel: str) -> str:
    """The NOTIFY channel used for ``channel``.

    Postgres channel names are identifiers of at most 63 bytes, while ours may be 255
    characters of any script; a hash fits every name, and each process maps it back.
    """
    return "bh_" + hashlib.blake2b(channel.encode(), digest_size=20).hexdigest()


class PostgresBackend(InboxTransport, BroadcastBackend):
    """LISTEN/NOTIFY on a Postgres database (URL ``postgres://user@host:port/db``).

    Notifications are delivered only to connected listeners, in commit order, with
    payloads under 8000 bytes; larger envelopes travel as notices and subscribers read
    the events from the log. A dropped listening connection is re-opened with backoff
    and every channel listened to again; meanwhile ``connected`` is false.

    Args:
        url: A libpq-style URL; ``postgresql+asyncpg://`` is accepted too.
        max_reconnect_delay: Longest pause, in seconds, between reconnection attempts.
        ping_interval: Seconds between liveness checks of the listening connection,
            which catch a peer that vanished without closing the socket; also the
            longest any statement (LISTEN, UNLISTEN, NOTIFY) waits for its answer
            before its connection is counted lost.
    """

    # NOTIFY refuses payloads of 8000 bytes or more (default server build).
    max_message_size = 7999
    crosses_processes = True
    _name = "postgres"

    def __init__(
        self, url: str, *, max_reconnect_delay: float = 5.0, ping_interval: float = 10.0
    ) -> None:
        super().__init__(url)
        scheme, sep, rest = url.partition("://")
        self._dsn = "postgresql://" + rest if sep and scheme.startswith("postgres") else url
        self._max_delay = max_reconnect_delay
        self._ping_interval = ping_interval
        self._names: dict[str, str] = {}  # NOTIFY identifier -> channel
        self._inbox: Inbox | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._publish_conn: asyncpg.Connection | None = None
        self._listen_lock: asyncio.Lock | None = None
        self._publish_lock: asyncio.Lock | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Set when the listening connection is lost: wakes the supervisor.
        self._lost: asyncio.Event | None = None
        self._unreachable = Sparse(logger, 60.0)  # failed reconnections, now and then

    @property
    def connected(self) -> bool:
        conn = self._listen_conn
        return conn is not None and not conn.is_closed()

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        self._inbox = Inbox()
        self._listen_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._listen_conn = await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="bh-postgres-listen")

    async def disconnect(self) -> None:
        # Everything let go of first: after an event loop ended without disconnect()
        # (the broadcast then calls this from the next one), its task and
        # connections cannot be awaited, and a connection kept failed the next sends.
        supervisor, self._supervisor = self._supervisor, None
        conns = [conn for conn in (self._listen_conn, self._publish_conn) if conn is not None]
        self._listen_conn = self._publish_conn = None
        self._names.clear()
        try:
            if supervisor is not None and not supervisor.get_loop().is_closed():
                supervisor.cancel()
                await asyncio.gather(supervisor, return_exceptions=True)
            for conn in conns:
                await _close(conn)
        finally:
            self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        ident = channel_identifier(channel)
        self._names[ident] = channel
        await self._on_listen_conn(lambda conn: conn.add_listener(ident, self._notified))

    async def unsubscribe(self, channel: str) -> None:
        ident = channel_identifier(channel)
        self._names.pop(ident, None)
        await self._on_listen_conn(lambda conn: conn.remove_listener(ident, self._notified))

    async def publish_many(self, messages: Sequence[tuple[str, str]]) -> None:
        if not messages:
            return
        idents = [channel_identifier(channel) for channel, _ in messages]
        payloads = [str(message) for _, message in messages]
        if self._publish_lock is None:
            raise NotConnected("the postgres transport is not connected")
        async with self._publish_lock:
            # One statement, one transaction: the notifications keep their order.
            for attempt in range(2):
                try:
                    if self._publish_conn is None or self._publish_conn.is_closed():
                        self._publish_conn = await self._open()
                    await self._publish_conn.execute(
                        "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                        idents,
                        payloads,
                        timeout=self._ping_interval,
                    )
                    return
                except asyncio.CancelledError:
                    # Cut short by the broadcast's own bound on a live send (a silent
                    # connection): asyncpg would hold the next statement until this
                    # one's cancellation is answered, which a silent server never does.
                    self._drop_publish_conn()
                    raise
                except asyncpg.DataError:
                    # A payload the database cannot hold (a character its encoding,
                    # LATIN1 say, lacks) failed the whole statement: the others go
                    # one by one, so only it is left to the log.
                    await self._notify_each(self._publish_conn, idents, payloads)
                    return
                except (asyncpg.PostgresError, *_TRANSIENT) as exc:
                    if not _transient(exc):
                        raise TransportError(f"postgres NOTIFY failed: {exc!r}") from exc
                    self._drop_publish_conn()  # lost, silent past the bound, or a standby
                    if attempt:
                        raise TransportError(f"postgres NOTIFY failed: {exc!r}") from exc

    async def _notify_each(
        self, conn: asyncpg.Connection, idents: Sequence[str], payloads: Sequence[str]
    ) -> None:
        refused: list[asyncpg.DataError] = []
        for ident, payload in zip(idents, payloads, strict=True):
            try:
                await conn.execute(
                    "SELECT pg_notify($1, $2)", ident, payload, timeout=self._ping_interval
                )
            except asyncpg.DataError as exc:
                refused.append(exc)
            except asyncio.CancelledError:
                self._drop_publish_conn()  # as in publish_many
                raise
            except (asyncpg.PostgresError, *_TRANSIENT) as exc:
                if _transient(exc):
                    self._drop_publish_conn()  # lost, silent past the bound, or a standby
                raise TransportError(f"postgres NOTIFY failed: {exc!r}") from exc
        if refused:
            raise TransportError(
                f"postgres NOTIFY refused {len(refused)} of {len(payloads)} messages "
                f"(subscribers read them from the log): {refused[0]!r}"
            ) from refused[0]

    # -- internals -----------------------------------------------------------------

    def _drop_publish_conn(self) -> None:
        if self._publish_conn is not None:
            self._publish_conn.terminate()
        self._publish_conn = None

    async def _open(self) -> asyncpg.Connection:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=10)
        except _TRANSIENT as exc:
            raise TransportError(f"cannot connect to postgres: {exc!r}") from exc
        except ValueError:
            # asyncpg's message may quote a piece of the URL, such as part of a
            # password holding a "/" that was not percent-encoded.
            raise TransportError(
                "the postgres URL could not be read (percent-encode special characters "
                "in the user name and password)"
            ) from None
        except asyncpg.PostgresError as exc:
            raise TransportError(f"postgres refused the connection: {exc!r}") from exc
        return conn

    def _notified(self, _conn: Any, _pid: int, ident: str, payload: str) -> None:
        channel = self._names.get(ident)
        if channel is not None and self._inbox is not None:
            self._inbox.put(Event(channel, payload))

    async def _on_listen_conn(self, operation: Any) -> None:
        assert self._listen_lock is not None
        async with self._listen_lock:
            conn = self._listen_conn
            if conn is None or conn.is_closed():
                return  # the supervisor re-listens every channel when it reconnects
            try:
                # Bounded: the lock is held, and the liveness ping waits for it.
                await wait_for(operation(conn), self._ping_interval)
            except (asyncpg.PostgresError, *_TRANSIENT) as exc:
                if not _transient(exc):
                    raise TransportError(f"postgres LISTEN failed: {exc!r}") from exc
                # Lost mid-call, or silent past the bound: the supervisor notices and
                # re-listens from _names.
                # Closed here too, should the call have failed on a live connection:
                # its LISTENs would no longer match _names.
                logger.info("postgres listening connection lost", exc_info=True)
                conn.terminate()
                if self._lost is not None:
                    self._lost.set()

    async def _supervise(self) -> None:
        """Keep the listening connection alive; on loss, reconnect and re-listen."""
        assert self._inbox is not None and self._listen_lock is not None
        try:
            while True:
                conn = self._listen_conn
                if conn is not None:
                    await self._watch(conn)
                self._listen_conn = None
                await self._reconnect()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._inbox.broke("the postgres listener", exc)  # reaches every subscriber

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return once ``conn`` is closed or stops answering."""
        lost = self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not conn.is_closed():
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(lost.wait(), self._ping_interval)
                break
            try:
                assert self._listen_lock is not None
                async with self._listen_lock:
                    await conn.fetchval("SELECT 1", timeout=self._ping_interval)
            except (asyncpg.PostgresError, *_TRANSIENT) as exc:
                if not _transient(exc):
                    raise
                break
        logger.warning("postgres listening connection lost; reconnecting")
        conn.terminate()

    async def _reconnect(self) -> None:
        assert self._listen_lock is not None
        backoff = Backoff(self._max_delay)
        while True:
            async with self._listen_lock:
                try:
                    conn = await self._open()
                    try:
                        for ident in list(self._names):
                            await wait_for(
                                conn.add_listener(ident, self._notified), self._ping_interval
                            )
                    except BaseException:
                        conn.terminate()
                        raise
                except TransportError as exc:
                    if not _transient(exc.__cause__):
                        raise
                    self._unreachable.warning("postgres listening connection: %s", exc)
                except (asyncpg.PostgresError, *_TRANSIENT) as exc:
                    if not _transient(exc):
                        raise
                    self._unreachable.warning("postgres listening connection: %r", exc)
                else:
                    # Set under the lock, so a subscribe waiting for it uses this one.
                    self._listen_conn = conn
                    self.reconnects += 1
                    logger.info("postgres listening connection re-established")
                    return
            await backoff.sleep()


async def _close(conn: asyncpg.Connection) -> None:
    """Close ``conn``: politely (2 s at most), else at once.

    A connection of an event loop that ended can do neither; its socket is shut
    down, so the server ends its session now rather than when the process exits.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 2)
    try:
        conn.terminate()
    except RuntimeError:  # its loop is closed
        with contextlib.suppress(Exception):
            conn._transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
