"""Redis Cluster pieces: URL to startup nodes, fault kinds, one master's subscription."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._cancel import wait_for
from .._errors import InvalidArgument, TransportError
from ._hosts import parse_hosts
from ._redis_common import CLIENT_NAME, as_text, cancel_and_wait, describe, is_transient

logger = logging.getLogger("broadcast_history")

SCHEMES = ("redis-cluster", "rediss-cluster")


def cluster_options(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """The startup nodes of ``url`` and the connection options for every node.

    ``redis-cluster://[user:password@]host:port[,host:port][?option=value&...]`` (port
    6379 if none); ``rediss-cluster://`` turns TLS on. Any one reachable node is enough
    to find the others. Options: redis-py's ``ssl_*`` (``ssl_ca_certs``,
    ``ssl_cert_reqs``, ``ssl_check_hostname``...) and socket settings, as in its URLs.

    Raises:
        InvalidArgument: The URL names no node, a port is not a number, or an option
            is not one of those.
    """
    userinfo, servers = parse_hosts(url, SCHEMES, 6379)
    nodes = [ClusterNode(host, port) for host, port in servers]
    scheme = url.partition("://")[0]
    user, _, password = userinfo.partition(":")
    options: dict[str, Any] = {
        "username": unquote(user) or None,
        "password": unquote(password) or None,
        "ssl": scheme == "rediss-cluster",
        "client_name": CLIENT_NAME,
        # RESP2: redis-py 8 defaults to RESP3, whose push handlers format each message
        # into a debug string (see the PUB/SUB transport); sharded PUB/SUB is the same.
        "protocol": 2,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 10.0,
        # One quick retry (after redis-py refreshes the slot map): a publish to a dead
        # node must not hold up the sends behind it for long.
        "retry": Retry(NoBackoff(), 1),
    }
    options.update(_query_options(url, tls=options["ssl"]))
    return nodes, options


#: Options a cluster URL may set besides ``ssl_*`` (ignored before, silently).
_SOCKET_OPTIONS = frozenset(
    {"socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval"}
)


def _query_options(url: str, *, tls: bool) -> dict[str, Any]:
    """The connection options in ``url``'s query, parsed as redis-py parses its own."""
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    # The TLS settings this redis-py's cluster client takes (a misspelt one failed
    # only at connect, with a TypeError).
    tls_options = {
        name
        for name in inspect.signature(RedisCluster.__init__).parameters
        if name.startswith("ssl_")
    }
    query = url.partition("?")[2]
    options: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name == "db" and values[-1] == "0":
            continue  # a cluster has database 0 only
        if name in tls_options and not tls:
            raise InvalidArgument(f"redis-cluster URL option {name!r}: use rediss-cluster://")
        if name not in tls_options and name not in _SOCKET_OPTIONS:
            raise InvalidArgument(
                f"redis-cluster URL option {name!r}: only "
                f"{', '.join(sorted(tls_options | _SOCKET_OPTIONS))} are read"
            )
        parse: Callable[[str], Any] = URL_QUERY_ARGUMENT_PARSERS.get(name, str)  # type: ignore[assignment]
        try:
            options[name] = parse(values[-1])
        except ValueError as exc:
            raise InvalidArgument(f"redis-cluster URL option {name!r}: {exc}") from exc
    return options


def is_cluster_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: a node is away, or slots are moving."""
    if _refused(exc):
        # redis-py wraps what failed its slot map refresh (a wrong password among
        # others) in a RedisClusterException: retried for ever, in silence.
        return False
    return is_transient(exc) or isinstance(
        exc, (rexc.AskError, rexc.TryAgainError, rexc.ClusterError, rexc.RedisClusterException)
    )


_REFUSED = (rexc.AuthenticationError, rexc.AuthorizationError, rexc.NoPermissionError)


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` or what it wraps (as cause or context, redis-py uses both)
    is a refusal that will last: a login, a missing permission, a server that is
    not a cluster node."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, _REFUSED) or "Cluster mode is not enabled" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Shard:
    """A connection to one master holding our ``SSUBSCRIBE``s, and the task reading it.

    redis-py's own reconnect is off (no retries): a lost connection must reach the
    transport, which then subscribes this shard's channels again where their slots
    now live. Left to itself redis-py would resubscribe all of this node's channels in
    one command, which the server refuses when they span several slots.
    """

    def __init__(self, host: str, port: int, options: dict[str, Any]) -> None:
        self.name = f"{host}:{port}"
        settings = {**options, "retry": Retry(NoBackoff(), 0)}
        self._client = aioredis.Redis(host=host, port=port, **settings)
        self.pubsub: PubSub = self._client.pubsub()
        #: Our SUNSUBSCRIBEs on this connection not yet confirmed, by channel.
        self.leaving: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    @property
    def ended(self) -> bool:
        """Whether its reading task stopped: the connection failed or a slot moved."""
        return self._task is not None and self._task.done()

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


#: Longest one master may take to take a batch's SPUBLISH pipeline: past it the master
#: counts as stalled (a frozen process, a partition dropping packets) and the other
#: masters' sends stop waiting for it.
NODE_TIMEOUT = 2.0
#: How often a stalled master is asked again, and the slot map refreshed (its replica
#: may have been promoted).
STALL_RECHECK = 1.0
# A batch's pipeline may take longer in proportion to its bytes (a catch-up batch of
# megabytes): a rate far below what a healthy master takes on loopback or a LAN.
_BYTES_PER_SECOND = 10_000_000
_DEFERS_FAILED = "last_failed_node_name" in inspect.signature(NodesManager.initialize).parameters


class ShardPublisher:
    """Sends ``SPUBLISH`` batches: one pipeline per owning master, all masters at once.

    redis-py's cluster pipeline does the same grouping but costs about 1.6 times as
    much CPU per message (measured with 100-message batches); publishing is the hot
    path, so the grouping is done here with the cluster client's slot map, and each
    master gets a plain client. A group that fails (its master died, or its slot
    moved) is sent once more after the slot map is refreshed.

    A master that does not take a batch within :data:`NODE_TIMEOUT` (more for a
    large batch) is set aside: its channels' events are not sent live (their
    subscribers read them from the log; ``send`` raises once the others are sent, so
    the broadcast counts the failure) until it answers a ping again or the slot map
    no longer names it. A frozen master delays no other master's channels.
    """

    def __init__(self, cluster: RedisCluster, options: dict[str, Any]) -> None:
        self._cluster = cluster
        self._options = options
        self._clients: dict[str, aioredis.Redis] = {}
        self._stalled: set[str] = set()
        self._recheck: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def send(self, messages: Sequence[tuple[str, Any]]) -> None:
        """Publish every ``(channel, message)``; order is kept within each master.

        Raises:
            TransportError: A group failed twice, or for a reason retrying cannot fix;
                or events were left unsent because their master is set aside (the
                others were sent).
        """
        pending = list(messages)
        unsent = 0  # events of masters set aside
        for attempt in range(2):
            groups: dict[str, tuple[ClusterNode, list[tuple[str, Any]]]] = {}
            for channel, message in pending:
                node = self._cluster.get_node_from_key(channel)
                assert node is not None  # a primary is always returned
                if node.name in self._stalled:
                    unsent += 1
                else:
                    groups.setdefault(node.name, (node, []))[1].append((channel, message))
            outcomes = await asyncio.gather(
                *(self._pipeline(node, items) for node, items in groups.values()),
                return_exceptions=True,
            )
            failures: list[BaseException] = []
            pending = []
            for (node, items), outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, asyncio.TimeoutError):
                    self._stall(node)
                    unsent += len(items)
                elif isinstance(outcome, BaseException):
                    failures.append(outcome)
                    pending += items  # only the failed groups are sent again
            if not failures:
                break
            error = failures[0]
            if not isinstance(error, (rexc.RedisError, rexc.RedisClusterException, OSError)):
                raise error
            if attempt or not is_cluster_transient(error):
                raise TransportError(f"redis-cluster SPUBLISH failed: {describe(error)}") from error
            await self._refresh(error)
        if unsent:
            raise TransportError(
                f"{unsent} events not sent live: their master is set aside until it answers "
                f"({', '.join(sorted(self._stalled))})"
            )

    async def close(self) -> None:
        recheck, self._recheck = self._recheck, None
        if recheck is not None:
            await cancel_and_wait(recheck)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        if self._background:
            # Clients closed in the background (set-aside masters' and pings'): a
            # short wait, since closing a frozen master's socket does not need it.
            await asyncio.wait(set(self._background), timeout=1.0)
            for task in list(self._background):
                await cancel_and_wait(task)

    async def _pipeline(self, node: ClusterNode, items: list[tuple[str, Any]]) -> None:
        client = self._clients.get(node.name)
        limit = NODE_TIMEOUT + sum(len(message) for _, message in items) / _BYTES_PER_SECOND
        if client is None:
            # Connecting counts too: on a frozen master it succeeds (the kernel
            # accepts) and the wait is for the reply, which must not take longer.
            client = self._clients[node.name] = aioredis.Redis(
                host=node.host, port=int(node.port), **self._options
            )

        async def execute() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for channel, message in items:
                    pipe.spublish(channel, message)
                await pipe.execute()

        await wait_for(execute(), limit)

    async def _refresh(self, cause: BaseException) -> None:
        try:
            await wait_for(self._cluster.nodes_manager.initialize(), 2 * NODE_TIMEOUT)
        except (rexc.RedisError, rexc.RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            raise TransportError(f"redis-cluster SPUBLISH failed: {describe(cause)}") from exc

    # -- stalled masters -----------------------------------------------------------

    def _stall(self, node: ClusterNode) -> None:
        """Set ``node`` aside; its client, cut off mid-command, is closed."""
        logger.warning(
            "redis node %s did not take a SPUBLISH in time: its channels are not sent "
            "live until it answers again or its replica takes over (subscribers read them "
            "from the log)",
            node.name,
        )
        self._stalled.add(node.name)
        client = self._clients.pop(node.name, None)
        if client is not None:
            self._in_background(client.aclose())
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.create_task(self._recheck_stalled(), name="bh-redis-stalled")

    async def _recheck_stalled(self) -> None:
        while self._stalled:
            await asyncio.sleep(STALL_RECHECK)
            try:
                await self._recheck_once()
            except Exception:  # never leave a master set aside for good
                logger.warning("checking stalled redis nodes failed", exc_info=True)

    async def _recheck_once(self) -> None:
        stalled = sorted(self._stalled)
        manager = self._cluster.nodes_manager
        # The stalled master last: asked first, it would hold the refresh up
        # (where redis-py can be told; older versions ask in their own order).
        hint: dict[str, Any] = {"last_failed_node_name": stalled[0]} if _DEFERS_FAILED else {}
        with contextlib.suppress(Exception):
            await wait_for(manager.initialize(**hint), 2 * NODE_TIMEOUT)
        masters = {node.name: node for node in self._cluster.get_primaries()}
        for name in stalled:
            node = masters.get(name)
            if node is None:
                logger.info("redis node %s is no longer a master: publishing goes on", name)
                self._stalled.discard(name)
            elif await self._answers(node):
                logger.info("redis node %s answers again: publishing to it goes on", name)
                self._stalled.discard(name)

    async def _answers(self, node: ClusterNode) -> bool:
        """Whether ``node`` answers a ping in time (an error reply is an answer)."""
        client = aioredis.Redis(host=node.host, port=int(node.port), **self._options)
        try:
            await wait_for(client.ping(), NODE_TIMEOUT)
            return True
        except rexc.ResponseError:
            return True
        except (rexc.RedisError, OSError, asyncio.TimeoutError):
            return False
        finally:
            self._in_background(client.aclose())

    def _in_background(self, closing: Coroutine[Any, Any, Any]) -> None:
        async def quietly() -> None:
            with contextlib.suppress(Exception):
                await closing

        task = asyncio.create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
