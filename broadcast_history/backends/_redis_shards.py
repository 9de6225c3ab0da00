"""Redis Cluster pieces: URL to startup nodes, fault kinds, one master's subscription."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._errors import InvalidArgument
from ._redis_common import CLIENT_NAME, as_text, cancel_and_wait, is_transient

SCHEMES = ("redis-cluster", "rediss-cluster")


def cluster_options(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """The startup nodes of ``url`` and the connection options for every node.

    ``redis-cluster://[user:password@]host:port[,host:port]`` (port 6379 if none);
    ``rediss-cluster://`` turns TLS on. Any one reachable node is enough to find the
    others.

    Raises:
        InvalidArgument: The URL names no node, or a port is not a number.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidArgument(f"not a redis-cluster:// URL: {url!r}")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    nodes = []
    for item in filter(None, hosts.split(",")):
        try:
            parts = urlsplit("//" + item)
            host, port = parts.hostname, parts.port or 6379
        except ValueError as exc:
            raise InvalidArgument(f"bad node {item!r} in {url!r}: {exc}") from exc
        if not host:
            raise InvalidArgument(f"bad node {item!r} in {url!r}")
        nodes.append(ClusterNode(host, port))
    if not nodes:
        raise InvalidArgument(f"no node in {url!r}: use redis-cluster://host:port[,host:port]")
    user, _, password = userinfo.partition(":")
    options: dict[str, Any] = {
        "username": unquote(user) or None,
        "password": unquote(password) or None,
        "ssl": scheme == "rediss-cluster",
        "client_name": CLIENT_NAME,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 10.0,
        # One quick retry (after redis-py refreshes the slot map): a publish to a dead
        # node must not hold up the sends behind it for long.
        "retry": Retry(NoBackoff(), 1),
    }
    return nodes, options


def is_cluster_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: a node is away, or slots are moving."""
    return is_transient(exc) or isinstance(
        exc, (rexc.AskError, rexc.TryAgainError, rexc.ClusterError, rexc.RedisClusterException)
    )


class Shard:
    """A connection to one master holding our ``SSUBSCRIBE``s, and the task reading it.

    redis-py's own reconnect is off (no retries): a lost connection must reach the
    transport, which then resubscribes every channel where its slot now lives. Left to
    itself redis-py would resubscribe all of this node's channels in one command, which
    the server refuses when they span several slots.
    """

    def __init__(self, host: str, port: int, options: dict[str, Any]) -> None:
        self.name = f"{host}:{port}"
        settings = {**options, "retry": Retry(NoBackoff(), 0)}
        self._client = aioredis.Redis(host=host, port=port, **settings)
        self.pubsub: PubSub = self._client.pubsub()
        self._task: asyncio.Task[None] | None = None

    def start(self, read: Callable[[Shard], Coroutine[Any, Any, None]]) -> None:
        """Start the reading task (once), after the first ``SSUBSCRIBE``."""
        if self._task is None:
            self._task = asyncio.create_task(read(self), name=f"bh-redis-shard-{self.name}")

    async def messages(self, ping_interval: float) -> AsyncIterator[tuple[str, str, Any]]:
        """``(type, channel, data)`` of each message; pings a silent connection.

        Raises:
            redis.exceptions.RedisError: The connection failed or a ping went unanswered.
        """
        pinged = False
        while True:
            message = await self.pubsub.get_message(timeout=ping_interval)
            if message is None:
                if pinged:
                    raise rexc.TimeoutError(f"redis node {self.name} did not answer a ping")
                await self.pubsub.ping()
                pinged = True
                continue
            pinged = False
            yield as_text(message["type"]), as_text(message["channel"]), as_text(message["data"])

    async def close(self) -> None:
        """Stop reading (first, so the reader does not report the closing as a failure)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
        with contextlib.suppress(Exception):
            await self._client.aclose()
