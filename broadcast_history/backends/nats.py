"""Core NATS PUB/SUB transport (nats-py), for ``nats://`` URLs.

Channel to subject: a channel may hold any 255 characters, dots, ``*``, ``>`` and
spaces included, while a NATS subject is dot-separated tokens without whitespace,
where ``*`` and ``>`` are wildcards. So every channel is one token after a prefix:
its UTF-8 bytes with ASCII letters, digits, ``-`` and ``_`` kept and every other byte
written ``%XX`` (upper-case hex). ``chat.room 1`` travels on ``bh.chat%2Eroom%201``.
The mapping is one-to-one (``%`` itself is escaped), readable for plain names, and
at most 3 KB long (255 four-byte characters), under NATS's 4 KiB control-line limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from nats import errors as nerr
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .._cancel import cancel_count, raise_if_cancelled_since
from .._errors import InvalidArgument, NotConnected, TransportError
from .._event import Event
from .._sparse import Sparse
from ._backoff import Backoff
from ._inbox import Inbox, InboxTransport
from ._nats_names import MAX_PREFIX, PREFIX, nats_servers, subject_for
from .base import BroadcastBackend

logger = logging.getLogger("broadcast_history")

# NATS's default max_payload: larger envelopes travel as offset-only notices.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# A subscribe's round trip is never cut short (see subscribe): this long, at most.
_FLUSH_LIMIT = 3600
# Seconds a socket may take to close (its unsent data written first) before it is
# dropped: a frozen server reads nothing, and nats-py would wait for it for ever.
CLOSE_WAIT = 5.0
# Pauses between attempts at a new client, after nats-py closed one for good.
_RENEW_FIRST = 0.5
_RENEW_LONGEST = 30.0
# Seconds between the refusals of the server logged (permissions violations).
_LOG_EVERY = 30.0


class NatsBackend(InboxTransport, BroadcastBackend):
    """Core NATS subjects (URL ``nats://host:4222[,host:4223]``); no JetStream.

    Messages reach the connections subscribed when they are published, at most once.
    nats-py reconnects by itself (to any server of the URL, or any it learns of),
    forever, and subscribes again; meanwhile ``connected`` is false and subscribers
    read what they miss from the log.

    Args:
        url: ``nats://[user:password@]host:port[,host:port]`` (port 4222 if none).
        subject_prefix: First tokens of every subject, e.g. one per application.
        max_payload: Largest message sent, in bytes; larger envelopes become notices.
            Keep it at or under the server's ``max_payload`` (1 MiB by default).
        reconnect_time_wait: Seconds between reconnection attempts to one server.
        ping_interval: Seconds between pings of the server; nats-py counts the
            connection lost at the third ping with two still unanswered, so a frozen
            server is noticed within three intervals (nats-py's own default, 2
            minutes, would take six).
        **connect_options: More ``nats.connect`` arguments (TLS, credentials...).
    """

    crosses_processes = True
    # A SUB goes into nats-py's buffer; the round trips that confirm them overlap.
    concurrent_subscribes = True
    _name = "nats"

    def __init__(
        self,
        url: str,
        *,
        subject_prefix: str = "bh",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        reconnect_time_wait: float = 0.5,
        ping_interval: float = 10.0,
        **connect_options: Any,
    ) -> None:
        super().__init__(url)
        self._servers = nats_servers(url)
        if not PREFIX.fullmatch(subject_prefix):
            raise InvalidArgument(f"subject_prefix {subject_prefix!r}: use dotted [A-Za-z0-9_-]")
        if len(subject_prefix) > MAX_PREFIX:
            # The longest channel's subject must stay under the server's control line
            # (4 KiB by default): a SUB the server refuses closes the connection.
            raise InvalidArgument(f"subject_prefix is longer than {MAX_PREFIX} characters")
        if max_payload < 1024:
            raise InvalidArgument(f"max_payload must be at least 1024 bytes, not {max_payload}")
        self._max_payload = max_payload
        self._prefix = subject_prefix
        self._attempts = connect_options.pop("max_reconnect_attempts", -1)
        self._options = {
            "reconnect_time_wait": reconnect_time_wait,
            "ping_interval": ping_interval,
            **connect_options,
        }
        self._nc: Client | None = None
        self._subs: dict[str, Subscription] = {}  # subject -> its subscription
        self._names: dict[str, str] = {}  # subject -> channel
        # Round trips of subscribe, with nats-py's list of awaited PONGs they are in.
        self._flushes: dict[asyncio.Future[None], object] = {}
        self._inbox: Inbox | None = None
        self._oversize_warned = False
        self._watchdog: asyncio.Task[None] | None = None
        # A new client on its way: nats-py closed the last one for good.
        self._renewing: asyncio.Task[None] | None = None
        # The errors nats-py reported while connect() tried (distinct, the first few):
        # why it found "no servers" (bad credentials, a TLS refusal...).
        self._connect_errors: dict[str, None] | None = None
        self._violations = Sparse(logger, _LOG_EVERY)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        if self._nc is not None:
            return
        self._inbox = Inbox()
        nc = await self._open()
        if nc.max_payload < self._max_payload:
            logger.warning(
                "nats server max_payload is %d bytes, under max_payload=%d: events are "
                "packed into envelopes of at most %d bytes, and larger events are not "
                "sent live (subscribers read them from the log)",
                nc.max_payload,
                self._max_payload,
                nc.max_payload,
            )
        self._use(nc)

    async def _open(self) -> Client:
        """A new connected client.

        Raises:
            TransportError: No server of the URL could be reached, or each refused.
        """
        nc = Client()

        async def closed() -> None:
            await self._on_closed(nc)

        options: dict[str, Any] = {
            "name": "broadcast_history",
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": closed,
            # Two tries of each server, then give up: a server that is down when we
            # start is an error for the caller, not a wait without end.
            "max_reconnect_attempts": 1,
            **self._options,
        }
        self._connect_errors = {}
        try:
            await nc.connect(self._servers, **options)
        except (nerr.Error, OSError, asyncio.TimeoutError) as exc:
            await _close(nc)
            # nats-py ends with NoServersError; the server's refusal (bad credentials)
            # came to error_cb before it.
            seen = f" (after {', '.join(self._connect_errors)})" if self._connect_errors else ""
            raise TransportError(f"cannot connect to nats: {exc!r}{seen}") from exc
        except BaseException:  # cancelled: its tasks must not outlive it
            await _close(nc)
            raise
        finally:
            self._connect_errors = None
        # Once connected, reconnect for as long as it takes (nats-py reads this option
        # at each attempt); subscribers meanwhile read from the log.
        nc.options["max_reconnect_attempts"] = self._attempts
        return nc

    def _use(self, nc: Client) -> None:
        self._nc = nc
        self._watchdog = asyncio.ensure_future(_unstick(nc))
        self._watchdog.add_done_callback(_watched)

    @property
    def max_message_size(self) -> int:  # type: ignore[override]  # an attribute in the base
        """The largest envelope sent: ``max_payload``, or the server's if lower.

        Read at each send (the wire packs events up to it): envelopes over the
        server's limit were dropped whole, the small events in them included, and
        nats-py updates the limit when it reconnects to another server.
        """
        nc = self._nc
        return self._max_payload if nc is None else min(nc.max_payload, self._max_payload)

    async def disconnect(self) -> None:
        nc, self._nc = self._nc, None
        watchdog, self._watchdog = self._watchdog, None
        renewing, self._renewing = self._renewing, None
        for task in (watchdog, renewing):
            if task is not None:
                task.cancel()
        if renewing is not None:  # it closes the client it was connecting
            await asyncio.gather(renewing, return_exceptions=True)
        if nc is not None:
            await _close(nc)
        for flush in list(self._flushes):  # no PONG comes any more
            flush.cancel()
        self._subs.clear()
        self._names.clear()
        self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        nc = self._require()
        subject = subject_for(channel, self._prefix)
        if subject in self._subs:
            return
        self._names[subject] = channel
        if self._renewing is not None:
            return  # the new client subscribes every name
        asked = cancel_count()
        try:
            self._subs[subject] = await nc.subscribe(subject, cb=self._received)
        except nerr.Error as exc:
            self._names.pop(subject, None)
            raise TransportError(f"nats SUB failed: {exc!r}") from exc
        # nats-py swallows a cancellation while its flusher's queue is full (past
        # 1,024 SUBs at once): the subscription opened for a caller that had left.
        # Raised again once it is recorded, so the broadcast's undo unsubscribes it.
        raise_if_cancelled_since(asked)
        if nc.is_connected:
            # A round trip, so the server has the SUB before a publish that follows;
            # if the connection is failing, nats-py sends it again on reconnect.
            # nats-py resolves a PONG's future without checking it: a flush cancelled
            # or timed out before its PONG makes the next PONG raise in its reader,
            # which ends live delivery while the client still says it is connected.
            # So the flush is never cut short: it runs on, and subscribe waits 5 s.
            flush = asyncio.ensure_future(nc.flush(timeout=_FLUSH_LIMIT))
            self._flushes[flush] = getattr(nc, "_pongs", None)
            flush.add_done_callback(_consumed)
            flush.add_done_callback(lambda done: self._flushes.pop(done, None))
            await asyncio.wait([flush], timeout=5)

    async def unsubscribe(self, channel: str) -> None:
        subject = subject_for(channel, self._prefix)
        self._names.pop(subject, None)
        sub = self._subs.pop(subject, None)
        if sub is not None and self._nc is not None:
            with contextlib.suppress(nerr.Error):  # closed or reconnecting: gone anyway
                await sub.unsubscribe()

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        nc = self._require()
        limit = min(nc.max_payload, self._max_payload)
        cancels = cancel_count()
        try:
            # Each publish only appends to nats-py's buffer; its flusher task writes
            # the whole buffer at once. No flush (round trip) per message or batch.
            for channel, message in messages:
                data = message.encode() if isinstance(message, str) else bytes(message)
                if len(data) > limit:
                    self._warn_oversize(len(data), limit)
                    continue
                await nc.publish(subject_for(channel, self._prefix), data)
                # nats-py swallows the cancellation of a publish waiting for its
                # flusher (its buffer past pending_size, a server reading nothing):
                # the send went on with the next message and never ended. Raised
                # again (on Python 3.11+; 3.10 cannot tell).
                raise_if_cancelled_since(cancels)
        except nerr.Error as exc:
            raise TransportError(f"nats PUB failed: {exc!r}") from exc

    # -- internals -----------------------------------------------------------------

    def _require(self) -> Client:
        if self._nc is None:
            raise NotConnected("the nats transport is not connected")
        return self._nc

    def _warn_oversize(self, size: int, limit: int) -> None:
        if not self._oversize_warned:
            self._oversize_warned = True
            logger.warning(
                "nats: a %d-byte envelope exceeds the server's max_payload (%d); such "
                "envelopes are dropped and read from the log (set max_payload=%d)",
                size,
                limit,
                limit,
            )

    async def _received(self, msg: Msg) -> None:
        channel = self._names.get(msg.subject)
        if channel is None or self._inbox is None:
            return
        data: str | bytes = msg.data
        with contextlib.suppress(UnicodeDecodeError):
            data = msg.data.decode()
        self._inbox.put(Event(channel, data))

    async def _on_error(self, exc: Exception) -> None:
        if self._connect_errors is not None and len(self._connect_errors) < 3:
            self._connect_errors[repr(exc)] = None
        if "permissions violation" in str(exc).lower():
            # The connection stays up, but what was refused (a publish, a subscribe
            # of a subject the user may not use) never travels: subscribers read it
            # from the log at their idle check. An operator must hear of it.
            self._violations.warning("nats refused this client: %s", exc)
            return
        # Reconnection attempts report each refusal here; the state change itself is
        # logged by the disconnected/reconnected callbacks.
        logger.debug("nats: %r", exc)

    async def _on_disconnected(self) -> None:
        # nats-py says "disconnected" before "closed" when it closes for good.
        if self._nc is not None and not self._nc.is_closed:
            logger.warning("nats connection lost; nats-py is reconnecting")

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        logger.info("nats connection re-established")
        # nats-py started a new list of awaited PONGs: a round trip from before would
        # wait out its limit (an hour). Ended here (nats-py sent the SUBs again); one
        # in the new list must not be, its cancelled future would end the reader.
        current = getattr(self._nc, "_pongs", None)
        for flush, pongs in list(self._flushes.items()):
            if pongs is not current:
                flush.cancel()

    async def _on_closed(self, nc: Client) -> None:
        if nc is not self._nc or self._inbox is None:
            return  # our disconnect(), or a client replaced already
        if self._attempts >= 0:
            # nats-py gave up, as max_reconnect_attempts asked: every subscriber
            # hears of it.
            self._inbox.fail(TransportError("the nats connection was closed for good"))
            return
        # An error of the server closed it (a payload over a server's smaller limit,
        # a subscription past max_subscriptions, credentials refused after a restart),
        # and nats-py never reconnects after one: a new client takes over.
        logger.warning(
            "nats closed the connection for good after %r; connecting a new one", nc.last_error
        )
        self._renewing = asyncio.ensure_future(self._renew(nc))

    async def _renew(self, old: Client) -> None:
        """Connect a new client in place of ``old`` (closed), with a backoff, and
        subscribe every channel again."""
        for flush in list(self._flushes):  # no PONG comes any more
            flush.cancel()
        self._subs.clear()  # the old client's
        backoff = Backoff(longest=_RENEW_LONGEST, first=_RENEW_FIRST)
        try:
            while self._nc is old:
                await backoff.sleep()
                try:
                    nc = await self._open()
                except TransportError as exc:
                    logger.warning("nats: no new connection yet: %s", exc)
                    continue
                try:
                    await self._subscribe_all(nc)
                except nerr.Error as exc:
                    logger.warning("nats: subscribing again failed: %r", exc)
                    await _close(nc)
                    continue
                except BaseException:  # cancelled: disconnect()
                    await _close(nc)
                    raise
                self._use(nc)
                self.reconnects += 1
                logger.info("nats connection re-established (a new client)")
                return
        finally:
            if self._renewing is asyncio.current_task():
                self._renewing = None

    async def _subscribe_all(self, nc: Client) -> None:
        """Subscribe ``nc`` to every channel named, those named meanwhile too."""
        while missing := [s for s in self._names if s not in self._subs]:
            for subject in missing:
                asked = cancel_count()
                sub = await nc.subscribe(subject, cb=self._received)
                if subject in self._names:
                    self._subs[subject] = sub
                else:  # unsubscribed meanwhile
                    await sub.unsubscribe()
                raise_if_cancelled_since(asked)  # see subscribe


def _sockets(nc: Client) -> list[asyncio.WriteTransport]:
    """The asyncio transports under ``nc``'s current socket (TLS's and the bare one)."""
    transport = getattr(nc, "_transport", None)
    writers = (getattr(transport, name, None) for name in ("_io_writer", "_bare_io_writer"))
    return [writer.transport for writer in writers if writer is not None]


async def _close(nc: Client) -> None:
    """Close ``nc``, its buffered publishes sent first if the server reads them within
    :data:`CLOSE_WAIT`; dropped otherwise (subscribers read them from the log)."""
    closing = asyncio.ensure_future(nc.close())
    try:
        await asyncio.wait({closing}, timeout=CLOSE_WAIT)
        if not closing.done():
            logger.warning(
                "nats: the server read nothing for %s s; its connection is dropped with "
                "what was not sent (subscribers read it from the log)",
                CLOSE_WAIT,
            )
            for socket in _sockets(nc):
                socket.abort()
            await asyncio.wait({closing}, timeout=1)  # its socket is gone: at once
    finally:
        if not closing.done():
            closing.cancel()
        closing.add_done_callback(_consumed)


async def _unstick(nc: Client) -> None:
    """Drop a socket that nats-py closes and that does not close.

    Reconnecting, nats-py closes the old socket and waits until it is closed before
    it tries any server. A socket holding unsent data for a server that reads nothing
    (frozen, or cut off without a reset) closes only once that data is written: never.
    The client then stayed disconnected for good, though other servers were up.
    """
    stuck = 0.0
    while not nc.is_closed:
        await asyncio.sleep(CLOSE_WAIT / 5)
        sockets = [s for s in _sockets(nc) if s.is_closing() and _unsent(s)]
        stuck = stuck + CLOSE_WAIT / 5 if sockets and nc.is_reconnecting else 0.0
        if stuck >= CLOSE_WAIT:
            logger.warning("nats: the old connection did not close in %s s; dropped", CLOSE_WAIT)
            for socket in sockets:
                socket.abort()
            stuck = 0.0


def _unsent(socket: asyncio.WriteTransport) -> int:
    """Bytes ``socket`` still holds to send; 0 once it is gone (a TLS transport whose
    connection was lost raises instead of answering)."""
    try:
        return socket.get_write_buffer_size()
    except (AttributeError, RuntimeError):
        return 0


def _watched(task: asyncio.Future[None]) -> None:
    """A watchdog that died would leave the next frozen server unnoticed: say so."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("nats: the watchdog of closing sockets failed", exc_info=task.exception())


def _consumed(task: asyncio.Future[None]) -> None:
    """Retrieve a background task's error: a subscribe's round trip or a close fails
    with the connection, which nats-py reports (and recovers) on its own."""
    if not task.cancelled():
        task.exception()


__all__ = ["NatsBackend", "nats_servers", "subject_for"]
