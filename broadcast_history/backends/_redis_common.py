"""What the Redis PUB/SUB and Redis Streams transports share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import Pipeline

from .._errors import NotConnected, TransportError
from ._inbox import InboxTransport

# Name of the transport's connections in CLIENT LIST, so operators can tell them apart.
CLIENT_NAME = "broadcast_history"


def describe(exc: BaseException) -> str:
    """``exc`` for a message: redis-py 8's ``repr`` of its errors leaves out their text."""
    return f"{type(exc).__name__}: {exc}"


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the server went away or is loading."""
    if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError)):
        return False
    return isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError))


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
) -> None:
    """Send one ``command`` per ``(channel, message)`` in a single round trip.

    Args:
        client: The client whose pool sends the pipeline.
        messages: The ``(channel, message)`` pairs, sent in order.
        add: Queues the command for one pair on the pipeline.
        command: The command's name, for the error message.

    Raises:
        TransportError: Redis refused the commands or could not be reached twice.
    """
    for attempt in range(2):  # once more on a fresh connection if the pooled one died
        try:
            async with client.pipeline(transaction=False) as pipe:
                for channel, message in messages:
                    add(pipe, channel, message)
                await pipe.execute()
            return
        except rexc.RedisError as exc:
            if attempt or not is_transient(exc):
                raise TransportError(f"redis {command} failed: {describe(exc)}") from exc


class PipelinedPublisher(InboxTransport):
    """``publish_many`` of a Redis transport: one pipelined round trip a batch.

    The transport sets ``_client`` once connected, names itself in ``_name`` and says
    how one message is queued on the pipeline in :meth:`_queue`.
    """

    _client: aioredis.Redis | None
    _name = "redis"
    _command = "PUBLISH"

    def _queue(self, pipe: Pipeline, channel: str, message: Any) -> object:
        return pipe.publish(channel, message)

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        """Send ``(channel, message)`` pairs in one pipeline."""
        if not messages:
            return
        if self._client is None:
            raise NotConnected(f"the {self._name} transport is not connected")
        await pipelined(self._client, messages, self._queue, self._command)


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
        try:
            if up:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ack), self._timeout)
        finally:
            if self._waiting.get(channel) is ack:
                del self._waiting[channel]

    def confirm(self, channel: str) -> None:
        """The server confirmed ``channel``."""
        ack = self._waiting.pop(channel, None)
        if ack is not None and not ack.done():
            ack.set_result(None)

    def release(self) -> None:
        """Let every waiting subscribe return (the connection is gone)."""
        for ack in self._waiting.values():
            if not ack.done():
                ack.set_result(None)
        self._waiting.clear()
