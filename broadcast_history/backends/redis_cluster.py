"""Redis Cluster sharded PUB/SUB transport, for ``redis-cluster://`` URLs.

``SPUBLISH`` sends a message to the shard that owns its channel's hash slot only,
instead of to every node as cluster-wide ``PUBLISH`` does, so publishing scales with
the number of masters. redis-py's asyncio ``RedisCluster`` keeps the slot map;
publishes go out as one pipeline per master (``ShardPublisher``). Subscriptions are
``SSUBSCRIBE`` on one connection per master, each read by its own task: redis-py's
asyncio ``ClusterPubSub`` (8.x) has ``ssubscribe``, but its ``get_sharded_message``
polls the nodes in turn, each for up to ``timeout``, so a reader would either spin or
wait up to nodes x timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from .._cancel import cancel_count, raise_if_cancelled_since, wait_for
from .._errors import NotConnected, TransportError
from .._event import Event
from .._sparse import Sparse
from ._backoff import Backoff
from ._inbox import Inbox, InboxTransport
from ._redis_common import CLIENT_NAME, Confirmations, cancel_and_wait, describe
from ._redis_shards import (
    NODE_TIMEOUT,
    Shard,
    ShardPublisher,
    cluster_options,
    is_cluster_transient,
)
from .base import BroadcastBackend, Health

logger = logging.getLogger("broadcast_history")


class RedisClusterBackend(Health, InboxTransport, BroadcastBackend):
    """Sharded PUB/SUB on a Redis 7 cluster (URL ``redis-cluster://host:port[,host:port]``).

    Any reachable node of the URL serves to discover the others. Messages reach the
    processes subscribed at the moment they are published. When a node's connection
    drops or a slot moves to another node, that node's channels are subscribed again
    on their current owners (with backoff), the other nodes' subscriptions staying
    live; meanwhile ``connected`` is false and subscribers read what they miss from
    the log.

    Args:
        url: ``redis-cluster://[user:password@]host:port[,host:port]``, or
            ``rediss-cluster://`` for TLS; ``?ssl_ca_certs=...&ssl_cert_reqs=...``
            and other ``ssl_*`` options as in redis-py's URLs.
        max_reconnect_delay: Longest pause, in seconds, between reconnection attempts.
        ping_interval: Seconds of silence after which a shard connection is pinged;
            no answer within as long again counts as a lost connection.
        connection_options: More keyword arguments for every node's connection
            (``ssl_ca_data``, ``ssl_certfile``...), over those of the URL.
    """

    crosses_processes = True
    # Placing a channel runs under the transport's lock; confirmations are awaited
    # together, so one from a frozen master holds up no other channel.
    concurrent_subscribes = True
    _name = "redis-cluster"

    def __init__(
        self,
        url: str,
        *,
        max_reconnect_delay: float = 5.0,
        ping_interval: float = 10.0,
        connection_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url)
        self._startup, self._options = cluster_options(url)
        self._options.update(connection_options or {})
        self._max_delay = max_reconnect_delay
        self._ping_interval = ping_interval
        self._cluster: RedisCluster | None = None
        self._publisher: ShardPublisher | None = None
        self._channels: set[str] = set()
        self._shards: dict[str, Shard] = {}  # node name -> its subscription connection
        self._owner: dict[str, str] = {}  # channel -> node name it is subscribed on
        self._acks = Confirmations()
        self._inbox: Inbox | None = None
        self._lock: asyncio.Lock | None = None
        self._trouble: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._up = False
        self._retrying = Sparse(logger, 60.0)  # failed resubscriptions, now and then

    async def connect(self) -> None:
        if self._supervisor is not None:
            return
        cluster = RedisCluster(startup_nodes=self._startup, **self._options)
        try:
            # The slot map only. RedisCluster.initialize() also asks the master of slot
            # 0 for its command table, which this transport never uses: while that one
            # master was down, no process could start, though the others served theirs.
            await cluster.nodes_manager.initialize()
        except BaseException as exc:  # cancelled too: nothing left open
            await _close(cluster)
            if isinstance(exc, (rexc.RedisError, rexc.RedisClusterException, OSError)):
                raise TransportError(
                    f"cannot connect to the redis cluster: {describe(exc)}"
                ) from exc
            raise
        self._cluster, self._up = cluster, True
        self._publisher = ShardPublisher(cluster, self._options)
        self._inbox, self._lock, self._trouble = Inbox(), asyncio.Lock(), asyncio.Event()
        self._fatal = None
        self._supervisor = asyncio.create_task(self._supervise(), name="bh-redis-cluster")

    async def disconnect(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            await cancel_and_wait(supervisor)
        await self._close_shards()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            await _close(cluster)
        self._up, self._lock = False, None  # subscribe now raises NotConnected
        self._channels.clear()
        self._acks.release()
        self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        if self._lock is None:
            raise NotConnected("the redis-cluster transport is not connected")
        ack = self._acks.expect(channel)
        added = channel not in self._channels
        try:
            async with self._lock:
                self._channels.add(channel)
                placed = self._up and await self._guard(self._place([channel]))
            # Not placed (its master failed): no confirmation will come, and the
            # resubscription places it. Waiting for one held every other subscribe of
            # the broadcast, which come one at a time, behind this one.
            await self._acks.wait(channel, ack, up=placed)
        except BaseException:
            # Failed or cancelled: no resubscription places it again, and the readers
            # drop its messages should the SSUBSCRIBE have reached a node. Its owner
            # is kept: the broadcast's undo then sends the SUNSUBSCRIBE there (without
            # it, the node kept the channel subscribed for good).
            self._acks.forget(channel, ack)
            if added:
                self._channels.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        if self._lock is None:
            return
        async with self._lock:
            self._channels.discard(channel)
            shard = self._shards.get(self._owner.pop(channel, ""))
            if shard is not None:
                shard.leaving[channel] += 1
                await self._guard(shard.pubsub.sunsubscribe(channel))

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        if not messages:
            return
        if self._publisher is None:
            raise NotConnected("the redis-cluster transport is not connected")
        await self._publisher.send(messages)

    # -- internals -----------------------------------------------------------------

    async def _guard(self, operation: Any) -> bool:
        """Run a subscription change; a lost node or moved slot triggers a resync
        (and ``False`` is returned)."""
        assert self._trouble is not None
        asked = cancel_count()
        done = True
        try:
            await operation
        except Exception as exc:
            if not is_cluster_transient(exc):
                raise TransportError(f"redis-cluster SSUBSCRIBE failed: {describe(exc)}") from exc
            logger.info("redis-cluster subscription failed; resubscribing: %s", describe(exc))
            self._trouble.set()
            done = False
        raise_if_cancelled_since(asked)  # as redis-py may swallow one (see redis.py)
        return done

    async def _place(self, channels: Sequence[str]) -> None:
        """SSUBSCRIBE ``channels`` on the masters owning them, one command per slot.

        A master that fails is left out (its shard closed, its channels unplaced) and
        the others are still placed; the first failure is raised at the end.
        """
        assert self._cluster is not None and self._inbox is not None
        by_slot: dict[tuple[str, int], list[str]] = {}
        for channel in channels:
            node = self._cluster.get_node_from_key(channel)
            assert node is not None  # a primary is always returned
            by_slot.setdefault((node.name, self._cluster.keyslot(channel)), []).append(channel)
        failure: Exception | None = None
        failed: set[str] = set()
        for (name, _slot), group in by_slot.items():
            if name in failed:
                continue
            shard = self._shards.get(name)
            if shard is None:
                node = self._cluster.get_node(node_name=name)
                assert node is not None
                shard = self._shards[name] = Shard(node.host, int(node.port), self._options)
            for channel in group:
                self._owner[channel] = name
            try:
                # Bounded as a publish to it is: this runs under the transport's lock,
                # and a frozen master held every other subscribe for redis-py's socket
                # timeout (10 s; 19-29 s in a probe, confirmations included).
                await wait_for(shard.pubsub.ssubscribe(*group), NODE_TIMEOUT)
            except Exception as exc:
                failure = failure or exc
                failed.add(name)
                await self._close_shard(name)
                continue
            # Read only once subscribed: a PubSub read before that has no connection.
            shard.start(self._read)
        if failure is not None:
            raise failure

    async def _replace(self) -> None:
        """Subscribe again what the ended shards held, and what moved.

        The shards of masters still reading stay as they are (a lost master used to
        take every channel's live delivery with it until it came back).
        """
        assert self._cluster is not None
        masters = {node.name for node in self._cluster.get_primaries()}
        for name in [n for n, shard in self._shards.items() if shard.ended or n not in masters]:
            await self._close_shard(name)
        unplaced = []
        for channel in sorted(self._channels):
            owner = self._owner.get(channel)
            node = self._cluster.get_node_from_key(channel)
            assert node is not None
            if owner in self._shards and node.name == owner:
                continue  # subscribed where its slot lives
            shard = self._shards.get(owner or "")
            if shard is not None:  # its slot moved from a master still reading
                shard.leaving[channel] += 1
                await shard.pubsub.sunsubscribe(channel)
            self._owner.pop(channel, None)
            unplaced.append(channel)
        await self._place(unplaced)

    async def _close_shard(self, name: str) -> None:
        shard = self._shards.pop(name, None)
        if shard is not None:
            for channel in [c for c, owner in self._owner.items() if owner == name]:
                del self._owner[channel]
            await shard.close()

    async def _close_shards(self) -> None:
        shards, self._shards = list(self._shards.values()), {}
        self._owner.clear()
        for shard in shards:
            await shard.close()

    async def _supervise(self) -> None:
        """Whenever a shard fails or a slot moves: refresh the slot map, resubscribe
        what it held."""
        await self._until_broken(
            "the redis-cluster subscription", self._recover, self._acks.release
        )

    async def _recover(self) -> None:
        assert self._inbox is not None and self._lock is not None and self._trouble is not None
        assert self._cluster is not None
        backoff = Backoff(self._max_delay)
        while True:
            await self._trouble.wait()
            if self._fatal is not None:
                raise self._fatal
            self._up = False
            await backoff.sleep()
            async with self._lock:
                self._trouble.clear()
                try:
                    # Bounded, as the publisher's refresh is: it runs under the lock
                    # that subscribes wait for, and a frozen startup node held it for
                    # redis-py's 10 s socket timeout.
                    await wait_for(self._cluster.nodes_manager.initialize(), 2 * NODE_TIMEOUT)
                    await self._replace()
                except Exception as exc:
                    if not is_cluster_transient(exc):
                        raise
                    self._retrying.warning("redis-cluster resubscription failed: %s", describe(exc))
                    self._trouble.set()
                    continue
                # Under the lock: a subscribe that waited for it places its channel.
                self._back_up("redis-cluster shard subscriptions")
            backoff.reset()

    async def _read(self, shard: Shard) -> None:
        """Read one shard's messages until its connection fails or a slot moves away."""
        assert self._inbox is not None and self._trouble is not None
        try:
            async for kind, channel, data in shard.messages(self._ping_interval):
                if kind == "smessage":
                    if channel in self._channels:
                        self._inbox.put(Event(channel, data))
                elif kind == "ssubscribe":
                    self._acks.confirm(channel)
                elif kind == "sunsubscribe":
                    if shard.leaving[channel] > 0:
                        shard.leaving[channel] -= 1
                        if not shard.leaving[channel]:
                            # Not kept at zero: over a connection's life, one key for
                            # every channel ever left.
                            del shard.leaving[channel]
                    elif channel in self._channels:
                        # The server dropped it: its slot moved to another node.
                        logger.info("redis-cluster slot of %r moved; resubscribing", channel)
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_cluster_transient(exc):
                self._fatal = exc
            elif self._up:
                logger.warning("redis-cluster shard %s lost: %r", shard.name, exc)
        # Their SSUBSCRIBE went with this connection: the resubscription sends it
        # again. Waiting on, they held their subscribes for the whole 5 s.
        self._acks.release(c for c, owner in self._owner.items() if owner == shard.name)
        self._trouble.set()


async def _close(cluster: RedisCluster) -> None:
    """Close the connections of ``cluster``'s slot map (its own ``aclose()`` does only
    once ``initialize()`` ran, which this transport does not call)."""
    try:
        await cluster.nodes_manager.aclose()
    finally:
        await cluster.nodes_manager.aclose("startup_nodes")


__all__ = ["CLIENT_NAME", "RedisClusterBackend"]
