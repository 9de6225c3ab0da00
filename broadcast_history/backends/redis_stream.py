"""Redis Streams transport (redis-py asyncio), for ``redis-stream://`` URLs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import Pipeline

from .._errors import InvalidArgument, NotConnected, TransportError
from .._event import Event
from .._validation import check_int, check_seconds
from . import _redis_common as shared
from ._backoff import Backoff
from ._inbox import Inbox
from .base import BroadcastBackend, Health

logger = logging.getLogger("broadcast_history")

#: Size of the table of expiries sent past which it drops the stale ones.
_PRUNE_AT = 4096
# What TYPE says of a key XREAD can read: a stream, or no key yet.
_STREAMLIKE = frozenset({"stream", "none"})


class RedisStreamBackend(Health, shared.PipelinedPublisher, BroadcastBackend):
    """One Redis stream per channel (URL ``redis-stream://host:port/db``).

    Each publish is an ``XADD`` to the stream ``prefix + channel``, trimmed to about
    ``maxlen`` entries: the log, not the stream, is the history. One connection reads
    every subscribed stream with ``XREAD BLOCK`` from the last entry present when the
    channel was subscribed, so after a reconnection it resumes where it stopped and
    loses nothing that is still in the stream. A stream expires ``ttl`` seconds after
    its last publish, so the streams of channels no longer used leave Redis.

    Args:
        url: ``redis-stream://`` (or ``rediss-stream://`` for TLS) followed by what a
            ``redis://`` URL would hold.
        maxlen: Approximate number of entries kept per stream.
        prefix: Prepended to channel names to make the stream keys.
        block: Longest time, in seconds, one ``XREAD`` waits for new entries.
        max_reconnect_delay: Longest pause, in seconds, between reconnection attempts.
        ttl: Seconds after its last publish that Redis deletes a channel's stream;
            ``None`` keeps streams until deleted by hand.

    Raises:
        InvalidArgument: ``maxlen`` is below 1 or ``ttl`` is not a positive number.
    """

    crosses_processes = True

    def __init__(
        self,
        url: str,
        *,
        maxlen: int = 10_000,
        prefix: str = "broadcast_history:",
        block: float = 1.0,
        max_reconnect_delay: float = 5.0,
        ttl: float | None = 3600.0,
    ) -> None:
        check_int("maxlen", maxlen, minimum=1)
        if ttl is not None and check_seconds("ttl", ttl) >= 1e12:
            raise InvalidArgument(f"ttl must be under 10**12 seconds, got {ttl}")
        super().__init__(url)
        scheme, _, rest = url.partition("://")
        self._redis_url = ("rediss://" if scheme.startswith("rediss") else "redis://") + rest
        self.maxlen = maxlen
        self.prefix = prefix
        self.ttl = ttl
        # PEXPIRE takes whole milliseconds; a ttl under one still expires, at once.
        self._ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        # Stream key -> when its expiry was last restarted; forgotten when the
        # connection drops (a restarted Redis lost the keys, and their expiries).
        self._expiry_sent: dict[str, float] = {}
        self._prune_at = _PRUNE_AT
        self._block_ms = max(1, int(block * 1000))
        self._max_delay = max_reconnect_delay
        self._ids: dict[str, str] = {}  # stream key -> id of the last entry seen
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None  # CLIENT ID of the reading connection
        self._reading = False
        self._changed: asyncio.Event | None = None
        self._inbox: Inbox | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = False

    async def connect(self) -> None:
        if self._task is not None:
            return
        client = aioredis.Redis.from_url(
            self._redis_url, **shared.TEXT_REPLIES, client_name=shared.CLIENT_NAME
        )
        # A dedicated connection: XREAD BLOCK holds it; a socket timeout longer than
        # the block catches a server that vanished without closing the socket.
        reader = aioredis.Redis.from_url(
            self._redis_url,
            **shared.TEXT_REPLIES,
            single_connection_client=True,
            client_name=f"{shared.CLIENT_NAME}:stream-reader",
            socket_timeout=self._block_ms / 1000 + 10,
        )
        await shared.ping(client, close=[client, reader])
        self._client, self._reader, self._up = client, reader, True
        self._inbox, self._changed = Inbox(), asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="bh-redis-stream")

    async def disconnect(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await shared.cancel_and_wait(task)
        for client in (self._client, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._client = self._reader = self._reader_id = None
        self._up = False
        self._ids.clear()
        self._expiry_sent.clear()
        self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        if self._client is None or self._changed is None:
            raise NotConnected("the redis-stream transport is not connected")
        key = self.prefix + channel
        try:
            # The "$" of this moment: the last entry now, or the very start if none.
            last = await self._client.xrevrange(key, count=1)
        except rexc.RedisError as exc:
            if not shared.is_transient(exc):
                raise TransportError(f"redis XREVRANGE failed: {shared.describe(exc)}") from exc
            last = []  # down: read the stream from its start once back; dups are dropped
        self._ids[key] = shared.as_text(last[0][0]) if last else "0-0"
        self._changed.set()
        if self._reading and self._reader_id is not None:
            # The XREAD in flight lacks this stream: end it so the next one has it.
            with contextlib.suppress(rexc.RedisError):
                await self._client.client_unblock(self._reader_id)

    async def unsubscribe(self, channel: str) -> None:
        # Entries of it still in flight are dropped when they arrive.
        self._ids.pop(self.prefix + channel, None)

    # -- internals -----------------------------------------------------------------

    _name = "redis-stream"
    _command = "XADD"

    def _queue(self, pipe: Pipeline, channel: str, message: Any) -> object:
        return pipe.xadd(
            self.prefix + channel, {"m": message}, maxlen=self.maxlen, approximate=True
        )

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        """Send ``(channel, message)`` pairs in order, in one round trip, restarting
        the expiry of their streams in the same round trip.

        Raises:
            TransportError: Redis refused a message or could not be reached twice.
        """
        if not messages:
            return
        client = self._connected()
        ttl_ms = self._ttl_ms
        if ttl_ms is None:
            await shared.pipelined(client, messages, self._queue, self._command)
            return
        # The expiry restarts with the publishes: only the streams of channels nobody
        # publishes to any more go away. A subscriber of one reads the new stream
        # (its entry ids are later), and catches up from the log if it was away.
        # Once per stream per tenth of the ttl keeps a stream in use alive; a PEXPIRE
        # per channel in every batch made a batch over 50 channels ~40 % slower.
        now = time.monotonic()
        stale = now - ttl_ms / 10_000
        sent = self._expiry_sent
        keys = dict.fromkeys(self.prefix + channel for channel, _ in messages)
        due = [key for key in keys if sent.get(key, -math.inf) <= stale]

        def expire(pipe: Pipeline, _messages: object) -> None:
            for key in due:
                pipe.pexpire(key, ttl_ms)

        await shared.pipelined(client, messages, self._queue, self._command, expire)
        # Only once the batch went: a retried or failed one sends its PEXPIREs again.
        for key in due:
            sent[key] = now
        if len(sent) > self._prune_at:
            for key in [key for key, when in sent.items() if when <= stale]:
                del sent[key]
            self._prune_at = max(_PRUNE_AT, 2 * len(sent))

    async def _run(self) -> None:
        """Read the subscribed streams; on errors reconnect with backoff and resume."""
        assert self._inbox is not None and self._changed is not None
        backoff = Backoff(self._max_delay)
        try:
            while True:
                if not self._ids and self._up:
                    # Nothing to read: a ping every `block` seconds (what a read of
                    # the streams costs), so ``connected`` and ``reconnects`` tell of
                    # an outage in a process that only publishes too.
                    self._changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self._block_ms / 1000)
                        continue
                try:
                    if not self._ids:
                        # Nothing to read: ping (until Redis answers, when it was lost:
                        # or ``connected`` would stay false for good).
                        assert self._reader is not None
                        await self._reader.ping()
                        reply = None
                    else:
                        reply = await self._read(dict(self._ids))
                except rexc.ResponseError as exc:
                    # A key of the prefix that is no stream (another app's): one XREAD
                    # reads every channel, so it failed them all, for good. Only its
                    # channels are read from the log instead.
                    if not str(exc).startswith("WRONGTYPE") or not await self._set_aside():
                        raise
                    continue
                except Exception as exc:
                    if not shared.is_transient(exc):
                        raise
                    if self._up:
                        logger.warning("redis stream connection lost: %s", shared.describe(exc))
                    self._up, self._reader_id = False, None
                    self._expiry_sent.clear()
                    await backoff.sleep()
                    continue
                self._back_up("redis stream connection")
                backoff.reset()
                if reply is not None:
                    self._deliver(reply)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._up = False
            self._inbox.broke("the redis stream reader", exc)  # reaches every subscriber

    async def _set_aside(self) -> bool:
        """Stop reading the subscribed keys that hold something else than a stream;
        whether there were any. A new ``subscribe`` to such a channel raises."""
        assert self._reader is not None
        keys = list(self._ids)
        try:
            async with self._reader.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.type(key)
                kinds = [shared.as_text(kind) for kind in await pipe.execute()]
        except rexc.RedisError as exc:
            if not shared.is_transient(exc):
                raise
            return True  # the next XREAD finds the connection lost, or the key again
        foreign = [
            (key, kind) for key, kind in zip(keys, kinds, strict=True) if kind not in _STREAMLIKE
        ]
        for key, kind in foreign:
            del self._ids[key]
            logger.error(
                "redis key %r is a %s, not a stream: live delivery of channel %r stops "
                "(its subscribers read it from the log); another application writes "
                "under prefix %r?",
                key,
                kind,
                key[len(self.prefix) :],
                self.prefix,
            )
        return bool(foreign)

    async def _read(self, streams: dict[str, str]) -> Any:
        assert self._reader is not None
        if self._reader_id is None:
            self._reader_id = await self._reader.client_id()
        self._reading = True
        try:
            return await self._reader.xread(streams, count=1000, block=self._block_ms)  # type: ignore[arg-type]
        finally:
            self._reading = False

    def _deliver(self, reply: Any) -> None:
        assert self._inbox is not None
        # RESP2 replies are [[key, entries], ...]; RESP3 ones {key: entries}, nested
        # once more before redis-py 8. Entries are (id, fields) tuples.
        items = reply.items() if isinstance(reply, dict) else (reply or [])
        for raw_key, raw_entries in items:
            key, entries = shared.as_text(raw_key), raw_entries
            if entries and isinstance(entries[0], list):
                entries = entries[0]
            if key not in self._ids or not entries:
                continue
            channel = key[len(self.prefix) :]
            for _entry_id, fields in entries:
                message = fields.get("m") if isinstance(fields, dict) else None
                if message is not None:
                    self._inbox.put(Event(channel, shared.as_text(message)))
            self._ids[key] = shared.as_text(entries[-1][0])
