"""What the Redis PUB/SUB and Redis Streams transports share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.commands.core import AsyncScript

from .._cancel import cancel_count, raise_if_cancelled_since
from .._errors import NotConnected, TransportError
from ._inbox import InboxTransport

# Name of the transport's connections in CLIENT LIST, so operators can tell them apart.
CLIENT_NAME = "broadcast_history"

logger = logging.getLogger("broadcast_history")


def describe(exc: BaseException) -> str:
    """``exc`` for a message: redis-py 8's ``repr`` of its errors leaves out their text."""
    return f"{type(exc).__name__}: {exc}"


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the server went away or is loading."""
    if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError)):
        return False
    return isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError))


#: How our own clients decode replies: as text, and bytes that are not UTF-8 (another
#: program's message) as lone surrogates instead of a UnicodeDecodeError, which would
#: end the read of every message behind it. Such a message is then not an envelope,
#: ignored and counted. (Commands never carry lone surrogates: publish refuses them.)
TEXT_REPLIES: dict[str, Any] = {"decode_responses": True, "encoding_errors": "surrogateescape"}


def as_text(value: Any) -> Any:
    """Decode bytes from a client made without ``decode_responses`` (envelopes are text)."""
    if isinstance(value, bytes):
        with contextlib.suppress(UnicodeDecodeError):
            return value.decode()
    return value


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended."""
    # On Python 3.11 redis-py can lose a cancellation that lands while it sends a
    # command (asyncio.wait_for swallows it), so cancel again until the task ends.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    await asyncio.gather(task, return_exceptions=True)


async def ping(client: aioredis.Redis, *, close: Sequence[aioredis.Redis]) -> None:
    """Check that the server answers; if not, close the clients ``close`` and raise.

    Raises:
        TransportError: The server is unreachable or refused the connection.
    """
    try:
        await client.ping()
    except rexc.RedisError as exc:
        for other in close:
            await other.aclose()
        raise TransportError(f"cannot connect to redis: {describe(exc)}") from exc


async def pipelined(
    client: aioredis.Redis,
    messages: Sequence[tuple[str, Any]],
    add: Callable[[Pipeline, str, Any], object],
    command: str,
    after: Callable[[Pipeline, Sequence[tuple[str, Any]]], object] | None = None,
) -> None:
    """Send one ``command`` per ``(channel, message)`` in a single round trip.

    Args:
        client: The client whose pool sends the pipeline.
        messages: The ``(channel, message)`` pairs, sent in order.
        add: Queues the command for one pair on the pipeline.
        command: The command's name, for the error message.
        after: Queues commands that follow the batch's, in the same round trip.

    Raises:
        TransportError: Redis refused the commands or could not be reached twice.
    """
    for attempt in range(2):  # once more on a fresh connection if the pooled one died
        try:
            async with client.pipeline(transaction=False) as pipe:
                for channel, message in messages:
                    add(pipe, channel, message)
                if after is not None:
                    after(pipe, messages)
                await pipe.execute()
            return
        except rexc.RedisError as exc:
            if attempt or not is_transient(exc):
                raise TransportError(f"redis {command} failed: {describe(exc)}") from exc


#: Lua that PUBLISHes each ``channel, message`` pair of its arguments, in order. Each
#: PUBLISH runs whatever the others do, as in a pipeline; the first one refused (an
#: ACL on its channel, say) is returned as text, and an empty text means all went.
PUBLISH_ALL = """
local refused = ''
for i = 1, #ARGV, 2 do
  local reply = redis.pcall('PUBLISH', ARGV[i], ARGV[i + 1])
  if refused == '' and type(reply) == 'table' and reply.err then
    refused = reply.err
  end
end
return refused
"""

#: A script call's size at most, in messages and in characters of messages: Redis
#: serves nobody else while a script runs, and copies its arguments, so a large batch
#: goes as several calls.
SCRIPT_PAIRS = 256
SCRIPT_CHARS = 1 << 20


def script_calls(messages: Sequence[tuple[str, Any]]) -> list[list[Any]]:
    """The arguments of each script call that publishes ``messages``, in order."""
    calls: list[list[Any]] = []
    args: list[Any] = []
    size = 0
    for channel, message in messages:
        if args and (len(args) >= 2 * SCRIPT_PAIRS or size + len(message) > SCRIPT_CHARS):
            calls.append(args)
            args, size = [], 0
        args.append(channel)
        args.append(message)
        size += len(message)
    calls.append(args)
    return calls


def refuses_scripts(exc: rexc.RedisError) -> bool:
    """Whether ``exc``, answering EVALSHA, says this server (or user) runs no scripts."""
    if isinstance(exc, rexc.NoPermissionError):
        return True
    text = str(exc).lower()
    return "unknown command" in text or "scripting" in text or "lua" in text


class PipelinedPublisher(InboxTransport):
    """``publish_many`` of a Redis transport: a batch in one round trip.

    The transport sets ``_client`` once connected, names itself in ``_name`` and says
    how one message is queued on a pipeline in :meth:`_queue`. A transport whose
    command is PUBLISH also sets ``_script_source``: several messages then go as
    calls of that script instead of a pipeline of one command per message: redis-py
    packs each pipelined command and parses each reply through its wrappers, and a
    commit over many channels sends a message per channel (over 100 channels that
    was 30 % of the event loop's time).
    """

    _client: aioredis.Redis | None
    _name = "redis"
    _command = "PUBLISH"
    _script_source: str | None = None
    _script: AsyncScript | None = None
    #: Set when the server refused scripts; a new connection tries them again.
    _scripts_refused = False
    #: Whether a lone message goes as ``_command channel message`` on a connection
    #: kept for it (see :meth:`_publish_one`) instead of a pipeline; the transport
    #: sets it when it connects.
    _plain_command = False
    # The kept connection and the pool it came from; the lock its sends take turns
    # on, replaced at each release, so a send that outlived a disconnect can tell.
    _held: tuple[AbstractConnection, ConnectionPool] | None = None
    _held_lock: asyncio.Lock | None = None

    def _queue(self, pipe: Pipeline, channel: str, message: Any) -> object:
        return pipe.publish(channel, message)

    def _connected(self) -> aioredis.Redis:
        """The client, or NotConnected."""
        client = self._client
        if client is None:
            raise NotConnected(f"the {self._name} transport is not connected")
        return client

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        """Send ``(channel, message)`` pairs in order, in one round trip (a few for
        a large batch).

        Raises:
            TransportError: Redis refused a message or could not be reached twice.
        """
        if not messages:
            return
        client = self._connected()
        if len(messages) == 1 and self._plain_command:
            channel, message = messages[0]
            await self._publish_one(client, channel, message)
            return
        if len(messages) > 1 and self._script_source is not None and not self._scripts_refused:
            messages = await self._scripted(client, self._script_source, messages)
            if not messages:
                return
        await pipelined(client, messages, self._queue, self._command)

    async def _publish_one(self, client: aioredis.Redis, channel: str, message: Any) -> None:
        """Send one message on a connection of ``client``'s pool kept for it.

        A commit on one channel sends one message; a pipeline of one command cost
        ~160 us of loop CPU here against ~90 us for the command on a kept connection
        (redis-py's pipeline takes a connection from the pool and gives it back,
        resets itself and records the call each time), most of a lone publish's
        transport work. Concurrent calls take turns on the one connection.

        Raises:
            TransportError: Redis refused the message or could not be reached twice,
                or the transport disconnected meanwhile.
        """
        lock = self._held_lock
        if lock is None:
            lock = self._held_lock = asyncio.Lock()
        async with lock:
            for attempt in range(2):  # once more on a fresh connection, as pipelined
                if self._held_lock is not lock:
                    raise TransportError(f"redis {self._command} failed: disconnected")
                held = self._held
                if held is None:
                    pool = client.connection_pool
                    # Untyped in redis-py (a decorator that warns of deprecated arguments).
                    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                    held = (conn, pool)
                    if self._held_lock is not lock:  # disconnected while connecting
                        await pool.release(conn)
                        raise TransportError(f"redis {self._command} failed: disconnected")
                    self._held = held
                conn = held[0]
                try:
                    packed = conn.pack_command(self._command, channel, message)
                except rexc.RedisError as exc:  # a value redis-py cannot send
                    raise TransportError(f"redis {self._command} failed: {describe(exc)}") from exc
                try:
                    await conn.send_packed_command(packed)
                    await conn.read_response()
                    return
                except rexc.ResponseError as exc:
                    # Refused (an ACL on the channel, say): the connection is fine.
                    raise TransportError(f"redis {self._command} failed: {describe(exc)}") from exc
                except BaseException as exc:
                    # Failed or cancelled between the command and its reply: the
                    # connection may hold an unread reply, so it is not used again.
                    await self._forget(held, broken=True)
                    if isinstance(exc, rexc.RedisError) and attempt == 0 and is_transient(exc):
                        continue
                    if isinstance(exc, rexc.RedisError):
                        raise TransportError(
                            f"redis {self._command} failed: {describe(exc)}"
                        ) from exc
                    raise

    async def release_held(self) -> None:
        """Give the connection kept for lone messages back to its pool; the transport
        calls this before it closes its client. A send still under way on it is
        ended (it fails as a lost connection) and not tried again."""
        lock, self._held_lock = self._held_lock, None
        held = self._held
        if held is not None:
            await self._forget(held, broken=lock is not None and lock.locked())

    async def _forget(
        self, held: tuple[AbstractConnection, ConnectionPool], *, broken: bool
    ) -> None:
        if self._held is not held:
            return  # given back already (by release_held)
        self._held = None
        conn, pool = held
        try:
            if broken:
                await conn.disconnect(nowait=True)
        finally:
            await pool.release(conn)

    async def _scripted(
        self, client: aioredis.Redis, source: str, messages: Sequence[tuple[str, Any]]
    ) -> Sequence[tuple[str, Any]]:
        """Send ``messages`` by script calls; what is left to send by pipeline if the
        server refused a call (see :func:`refuses_scripts`).

        Raises:
            TransportError: Redis refused a message or could not be reached twice.
        """
        script = self._script
        if script is None:
            # redis-py loads it again by itself when the server answers NOSCRIPT.
            script = self._script = client.register_script(source)
        sent = 0
        for args in script_calls(messages):
            for attempt in range(2):  # as pipelined: once more on a fresh connection
                try:
                    # This connection's client: a reconnected transport has a new one.
                    refused = await script(args=args, client=client)
                    break
                except rexc.RedisError as exc:
                    if is_transient(exc):
                        if attempt:
                            raise TransportError(
                                f"redis {self._command} failed: {describe(exc)}"
                            ) from exc
                        continue
                    # The call was refused, so none of its messages went (or, if
                    # the script was killed, some went and go again: subscribers
                    # drop the copies by offset).
                    if refuses_scripts(exc):
                        logger.warning(
                            "redis refused the publishing script (%s): pipelines until "
                            "the transport connects again",
                            describe(exc),
                        )
                        self._scripts_refused = True
                    return messages[sent:]
            if refused:
                text = refused.decode() if isinstance(refused, bytes) else str(refused)
                raise TransportError(f"redis {self._command} failed: {text}")
            sent += len(args) // 2
        return ()


class Confirmations:
    """Subscribes waiting until the server confirms them (a ``subscribe`` reply).

    A subscribe returns once the server has registered the channel, so a publish
    right after it is heard. If the connection is failing, it returns after
    ``timeout`` and the reconnection subscribes the channel.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._waiting: dict[str, asyncio.Future[None]] = {}

    def expect(self, channel: str) -> asyncio.Future[None]:
        """Start waiting for ``channel`` (before sending the command)."""
        ack = self._waiting[channel] = asyncio.get_running_loop().create_future()
        return ack

    async def wait(self, channel: str, ack: asyncio.Future[None], *, up: bool) -> None:
        """Wait for ``ack`` (if the connection is ``up``), then forget it."""
        asked = cancel_count()
        try:
            if up:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ack), self._timeout)
        finally:
            self.forget(channel, ack)
        raise_if_cancelled_since(asked)

    def forget(self, channel: str, ack: asyncio.Future[None]) -> None:
        """Stop waiting for ``ack`` (its subscribe failed, or was waited for)."""
        if self._waiting.get(channel) is ack:
            del self._waiting[channel]

    def confirm(self, channel: str) -> None:
        """The server confirmed ``channel``."""
        ack = self._waiting.pop(channel, None)
        if ack is not None and not ack.done():
            ack.set_result(None)

    def release(self, channels: Iterable[str] | None = None) -> None:
        """Let every waiting subscribe return, or those of ``channels`` (their
        connection is gone)."""
        names = list(self._waiting) if channels is None else list(channels)
        for channel in names:
            ack = self._waiting.pop(channel, None)
            if ack is not None and not ack.done():
                ack.set_result(None)
