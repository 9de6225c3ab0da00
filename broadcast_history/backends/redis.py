"""Redis PUB/SUB transport (redis-py asyncio), for ``redis://`` and ``rediss://`` URLs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub

from .._cancel import cancel_count, raise_if_cancelled_since
from .._errors import InvalidArgument, NotConnected, TransportError
from .._event import Event
from .._sparse import Sparse
from . import _redis_common as shared
from ._backoff import Backoff
from ._inbox import Inbox
from .base import BroadcastBackend, Health

logger = logging.getLogger("broadcast_history")


class _MissingTarget(InvalidArgument, AssertionError):
    """``RedisBackend()`` with neither url nor conn: also an ``AssertionError``, as
    broadcaster's assert raised."""


class RedisBackend(Health, shared.PipelinedPublisher, BroadcastBackend):
    """Redis PUB/SUB (URL ``redis://host:port/db``, or ``rediss://`` for TLS).

    Messages reach only the processes subscribed at the moment they are published;
    whatever is missed while the connection is down is read from the log by the
    subscribers. A dropped subscription connection is re-opened with backoff and every
    channel subscribed again; meanwhile ``connected`` is false.

    Args:
        url: A redis-py URL; query options such as ``?ssl_cert_reqs=none`` are honoured.
        conn: A preconfigured ``redis.asyncio.Redis`` instead of ``url`` (as in
            broadcaster 0.3). It stays yours: ``disconnect`` does not close it.
        max_reconnect_delay: Longest pause, in seconds, between reconnection attempts.
        ping_interval: Seconds of silence after which the subscription connection is
            pinged; no answer within as long again counts as a lost connection (both
            checked every half interval).
    """

    crosses_processes = True
    # Only the SUBSCRIBE is sent under the transport's lock; confirmations are
    # awaited together.
    concurrent_subscribes = True
    _name = "redis"
    _script_source = shared.PUBLISH_ALL

    def __init__(
        self,
        url: str | None = None,
        *,
        conn: aioredis.Redis | None = None,
        max_reconnect_delay: float = 5.0,
        ping_interval: float = 10.0,
    ) -> None:
        if url is None and conn is None:
            # broadcaster asserted this, in these words: code written for it may match.
            raise _MissingTarget("conn must be provided if url is not")
        if url is not None and conn is not None:
            raise InvalidArgument("give RedisBackend a url or a conn, not both")
        super().__init__(url or "")
        self._given = conn
        self._max_delay = max_reconnect_delay
        self._ping_interval = ping_interval
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._channels: set[str] = set()
        self._replies = 0  # read from the subscription connection, for the silence check
        self._acks = shared.Confirmations()
        self._inbox: Inbox | None = None
        self._lock: asyncio.Lock | None = None
        self._wanted: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        self._up = False
        self._retrying = Sparse(logger, 60.0)  # failed reconnections, now and then

    async def connect(self) -> None:
        if self._reader is not None:
            return
        # RESP2 unless the URL asks for ``protocol=3``: redis-py (8 defaults to RESP3)
        # passes each RESP3 push message through handlers that format it into a debug
        # string whether or not debug is on, a third of reading a message here.
        client = self._given or aioredis.Redis.from_url(
            self._url, **shared.TEXT_REPLIES, client_name=shared.CLIENT_NAME, protocol=2
        )
        await shared.ping(client, close=[] if self._given else [client])
        self._client, self._up = client, True
        self._scripts_refused = False
        # A connection kept for lone messages holds a slot of the pool for good: not
        # in a client the application gave (its pool may be small, and is its own).
        self._plain_command = self._given is None and client.connection_pool.max_connections > 8
        self._inbox, self._lock, self._wanted = Inbox(), asyncio.Lock(), asyncio.Event()
        self._reader = asyncio.create_task(self._run(), name="bh-redis-pubsub")

    async def disconnect(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await shared.cancel_and_wait(reader)
        await self._close_pubsub()
        client, self._client = self._client, None
        try:
            await self.release_held()
            if client is not None and self._given is None:
                await client.aclose()
        finally:
            self._up = False
            self._channels.clear()
            self._acks.release()
            self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        if self._lock is None or self._wanted is None:
            raise NotConnected("the redis transport is not connected")
        ack = self._acks.expect(channel)
        added = channel not in self._channels
        try:
            async with self._lock:
                self._channels.add(channel)
                # The reader starts only now: on redis-py 8 a PubSub read before the
                # first SUBSCRIBE has no connection to read from and ends at once.
                self._wanted.set()
                await self._send(lambda pubsub: pubsub.subscribe(channel))
            await self._acks.wait(channel, ack, up=self._up)
        except BaseException:
            # Failed or cancelled: no reconnection subscribes it again, and the reader
            # drops its messages should the SUBSCRIBE have reached Redis.
            self._acks.forget(channel, ack)
            if added:
                self._channels.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        # A reconnection reads the set without yielding: no lock needed to change it.
        self._channels.discard(channel)
        if self._lock is not None:
            async with self._lock:
                await self._send(lambda pubsub: _unsubscribe(pubsub, channel))

    # -- internals -----------------------------------------------------------------

    async def _send(self, command: Any) -> None:
        """Run a (un)subscribe on the open subscription connection, if there is one."""
        pubsub = self._pubsub
        if pubsub is None:
            return  # the reader subscribes every channel when it (re)connects
        asked = cancel_count()
        try:
            await command(pubsub)
        except Exception as exc:
            # A connection that broke (the reader's read failed) or was closed (by
            # disconnect(); the reader closes it only with the lock held) under the
            # command makes redis-py fail in ways of its own, AttributeError among them:
            # the reconnection subscribes the channel, as after a transient error.
            connection = pubsub.connection
            gone = (
                self._pubsub is not pubsub
                or connection is None
                or not getattr(connection, "is_connected", True)
            )
            if not gone and not (isinstance(exc, rexc.RedisError) and shared.is_transient(exc)):
                raise TransportError(f"redis SUBSCRIBE failed: {shared.describe(exc)}") from exc
            # Debug only: the reader reports the loss, once. Logged here, every
            # subscribe under way logged it with a traceback: ~300 of them, 13,000
            # lines, for one Redis crash in a probe's reconnect storm.
            logger.debug("redis (un)subscribe met a lost connection", exc_info=True)
        raise_if_cancelled_since(asked)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def _run(self) -> None:
        """Read messages; on a lost connection reconnect with backoff and resubscribe."""
        await self._until_broken("the redis subscription", self._loop, self._acks.release)

    async def _loop(self) -> None:
        assert self._inbox is not None and self._lock is not None and self._wanted is not None
        backoff = Backoff(self._max_delay)
        await self._wanted.wait()
        while True:
            try:
                async with self._lock:
                    assert self._client is not None
                    pubsub = self._pubsub = self._client.pubsub()
                    if self._channels:
                        await pubsub.subscribe(*self._channels)
                    else:  # all unsubscribed meanwhile: still give the reads a connection
                        await pubsub.connect()  # type: ignore[no-untyped-call]
                self._back_up("redis subscription connection")
                backoff.reset()
                await self._read(pubsub)
            except Exception as exc:
                if not shared.is_transient(exc):
                    raise
                if self._up:
                    logger.warning("redis subscription connection lost: %s", shared.describe(exc))
                else:  # still away: why, now and then
                    self._retrying.warning(
                        "redis subscription connection: reconnecting failed: %s",
                        shared.describe(exc),
                    )
                self._up = False
                # Their SUBSCRIBE went with the connection: the reconnection sends it
                # again. Waiting on, they held their subscribes for the whole 5 s.
                self._acks.release()
            # With the lock: a (un)subscribe may be sending on it right now, and redis-py
            # fails with AttributeError when its connection goes away under a command.
            async with self._lock:
                await self._close_pubsub()
            await backoff.sleep()

    async def _read(self, pubsub: PubSub) -> None:
        """Receive until the connection fails; ping it when it has been quiet.

        A task of its own reads; this one watches it. ``PubSub.get_message`` puts a
        timeout context, a retry wrapper and a message dict around every read, about
        half of the CPU a message costs here, so the reader takes the parser's
        replies from the connection itself, and the silence check costs a wake-up
        per half ``ping_interval`` instead.
        """
        connection = pubsub.connection
        assert connection is not None
        reader = asyncio.create_task(self._receive(connection), name="bh-redis-read")
        try:
            await self._watch(reader, connection)
        except BaseException as exc:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            lost = None if reader.cancelled() else reader.exception()
            if isinstance(exc, asyncio.CancelledError) or lost is None or lost is exc:
                raise
            if not shared.is_transient(lost):
                raise lost from exc  # the reader's failure is the worse one
            raise

    async def _watch(self, reader: asyncio.Task[None], connection: Any) -> None:
        """Raise when ``reader`` fails, or when a ping sent after a quiet
        ``ping_interval`` gets no reply within another."""
        half = self._ping_interval / 2
        seen = self._replies
        quiet = 0  # half intervals without a reply
        pinged_at: int | None = None
        while True:
            done, _ = await asyncio.wait({reader}, timeout=half)
            if done:
                reader.result()  # it only ends by failing
            if self._replies != seen:
                seen, quiet, pinged_at = self._replies, 0, None
                continue
            quiet += 1
            if pinged_at is None:
                if quiet >= 2:
                    # Sent without redis-py's health check: that would read the
                    # connection itself, beside the reader.
                    await connection.send_command("PING", check_health=False)
                    pinged_at = quiet
            elif quiet - pinged_at >= 2:
                raise rexc.TimeoutError("redis did not answer a ping")

    async def _receive(self, connection: Any) -> None:
        inbox = self._inbox
        assert inbox is not None
        channels = self._channels
        as_text = shared.as_text
        while True:
            # math.inf: block without a timeout (None would mean the socket timeout).
            try:
                reply = await connection.read_response(timeout=math.inf, push_request=True)
            except UnicodeDecodeError as exc:
                # A client the application gave, decoding strictly, met a message that
                # is not UTF-8 (another program's). redis-py dropped the connection:
                # reconnect; the log fills in what passes meanwhile.
                raise rexc.ConnectionError(f"a message was not UTF-8 ({exc})") from exc
            self._replies += 1
            if not isinstance(reply, list):
                continue  # PONG while subscribed to nothing (RESP2: ["pong", ""] otherwise)
            kind = reply[0]
            if kind in _MESSAGE:
                channel = as_text(reply[1])
                if channel in channels:
                    inbox.put(Event(channel, as_text(reply[2])))
            elif kind in _SUBSCRIBE:
                self._acks.confirm(as_text(reply[1]))


async def _unsubscribe(pubsub: PubSub, channel: str) -> None:
    await pubsub.unsubscribe(channel)
    # The reader takes the replies off the connection itself, so redis-py never sees
    # the confirmation that makes it forget a channel: forget it here, or its tables
    # grow by every channel ever subscribed for as long as the connection lives.
    for key in (channel, channel.encode()):  # bytes, in a client without decode_responses
        pubsub.channels.pop(key, None)
        pubsub.pending_unsubscribe_channels.discard(key)


# A reply's kind, as bytes or, from a client with decode_responses, as text.
_MESSAGE = (b"message", "message")
_SUBSCRIBE = (b"subscribe", "subscribe")

#: The name our connections give Redis (``CLIENT LIST``), to tell them apart.
CLIENT_NAME = shared.CLIENT_NAME

__all__ = ["CLIENT_NAME", "RedisBackend"]
