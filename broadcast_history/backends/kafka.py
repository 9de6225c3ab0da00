"""Kafka transport (aiokafka), for ``kafka://host:port[,host:port]`` URLs.

Each channel gets its own topic, created when first used. The consumer has no group
and commits nothing: it starts at the end of a topic when the channel is subscribed,
because history comes from the event log, never from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from .._errors import NotConnected, TransportError
from .._event import Event
from ._inbox import Inbox
from .base import BroadcastBackend

logger = logging.getLogger("broadcast_history")

_MAX_TOPIC = 249  # Kafka's limit on topic name length
_ILLEGAL = re.compile(r"[^a-zA-Z0-9._-]")
# Transient trouble: the broker is away, restarting or slow. Worth another try.
_TRANSIENT = (OSError, asyncio.TimeoutError)


def topic_for(channel: str, prefix: str = "bh.") -> str:
    """The Kafka topic that carries ``channel``.

    Topic names allow only ``[a-zA-Z0-9._-]`` and 249 characters, while channel names
    may hold any 255 characters; the readable part is sanitized and cut, and a hash
    of the whole name keeps distinct channels on distinct topics.
    """
    digest = hashlib.blake2b(channel.encode(), digest_size=8).hexdigest()
    room = _MAX_TOPIC - len(prefix) - len(digest) - 1
    return f"{prefix}{_ILLEGAL.sub('_', channel)[:room]}.{digest}"


def _servers(urls: str | Sequence[str]) -> list[str]:
    servers: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        netloc = urlsplit(url).netloc if "://" in url else url
        for host in filter(None, netloc.split(",")):
            servers.append(host if ":" in host.rsplit("]", 1)[-1] else f"{host}:9092")
    if not servers:
        raise ValueError(f"no Kafka bootstrap server in {urls!r}")
    return servers


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) or (isinstance(exc, KafkaError) and exc.retriable)


class KafkaBackend(BroadcastBackend):
    """Kafka topics as a live transport (URL ``kafka://host:port[,host:port]``).

    Compatible with broadcaster's ``KafkaBackend(urls=[...])``. Messages of a channel
    share a key, so they stay on one partition and in order. A broker that goes away
    is pinged with backoff; meanwhile ``connected`` is false, publishing skips the
    live send and subscribers read from the log. Once it answers again, missing
    topics are re-created and consumer positions past a topic's end (a topic that
    was re-created) are moved to its start.

    Args:
        urls: One URL or a list; each may name several ``host:port`` brokers.
        topic_prefix: Prefix of every topic this transport creates.
        num_partitions: Partitions of a created topic.
        replication_factor: Replicas of a created topic.
        ping_interval: Seconds between liveness checks of the broker.
        max_reconnect_delay: Longest pause, in seconds, between checks of a broker
            that is away.
        timeout: Seconds a publish or a subscribe waits for the broker.
        client_options: Extra keyword arguments for the aiokafka clients
            (``security_protocol``, ``ssl_context``, ``sasl_*``...).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        topic_prefix: str = "bh.",
        num_partitions: int = 1,
        replication_factor: int = 1,
        ping_interval: float = 1.0,
        max_reconnect_delay: float = 5.0,
        timeout: float = 5.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(urls if isinstance(urls, str) else ",".join(urls))
        self._servers = _servers(urls)
        self._prefix = topic_prefix
        self._new_topic = {
            "num_partitions": num_partitions,
            "replication_factor": replication_factor,
        }
        self._ping_interval = ping_interval
        self._max_delay = max_reconnect_delay
        self._timeout = timeout
        self._options = dict(client_options or {})
        self._channels: dict[str, str] = {}  # topic -> channel, for subscribed channels
        self._known: set[str] = set()  # topics known to exist
        self._next: dict[TopicPartition, int] = {}  # next offset to deliver per partition
        self._generation = 0  # bumped at each re-assignment
        self._up = False
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._lookup: AIOKafkaConsumer | None = None
        self._inbox: Inbox | None = None
        self._lock: asyncio.Lock | None = None
        self._assigned: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self._up

    def topic(self, channel: str) -> str:
        """The topic this transport uses for ``channel``."""
        return topic_for(channel, self._prefix)

    async def connect(self) -> None:
        if self._tasks:
            return
        options = {"bootstrap_servers": self._servers, **self._options}
        self._producer = AIOKafkaProducer(**options)
        self._consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="latest", **options
        )
        # Offsets are looked up on a connection of their own: on the fetching one they
        # would queue behind the broker's long-poll of the current fetch.
        self._lookup = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **options)
        self._admin = AIOKafkaAdminClient(**options)
        try:
            for client in (self._producer, self._consumer, self._lookup, self._admin):
                await asyncio.wait_for(client.start(), self._timeout * 2)
        except (KafkaError, *_TRANSIENT) as exc:
            await self._close_clients()
            raise TransportError(f"cannot connect to Kafka at {self._servers}: {exc!r}") from exc
        self._inbox = Inbox()
        self._lock = asyncio.Lock()
        self._assigned = asyncio.Event()
        self._up = True
        self._tasks = [
            asyncio.create_task(self._fetch(), name="bh-kafka-fetch"),
            asyncio.create_task(self._watch(), name="bh-kafka-watch"),
        ]

    async def disconnect(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_clients()
        self._up = False
        self._channels.clear()
        self._known.clear()
        self._next.clear()
        if self._inbox is not None:
            # Wakes a pending next_published at once.
            self._inbox.fail(NotConnected("the kafka transport was disconnected"))

    async def subscribe(self, channel: str) -> None:
        self._channels[self.topic(channel)] = channel
        await self._sync_assignment()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.pop(self.topic(channel), None)
        await self._sync_assignment()

    async def publish(self, channel: str, message: Any) -> None:
        await self.publish_many([(channel, message)])

    async def publish_many(self, messages: Sequence[tuple[str, str]]) -> None:
        producer = self._producer
        if producer is None:
            raise NotConnected("the kafka transport is not connected")
        if not self._up:
            # Subscribers read the log while the broker is away, and the outage was
            # logged once: a send would only wait, and a warning per publish is noise.
            logger.debug("kafka broker unreachable; live send of %d skipped", len(messages))
            return
        try:
            await asyncio.wait_for(self._send(producer, messages), self._timeout)
        except (KafkaError, *_TRANSIENT) as exc:
            self._known.clear()  # the topics may be gone with the broker
            if _retriable(exc):
                self._up = False
            raise TransportError(f"Kafka send failed: {exc!r}") from exc

    async def _send(self, producer: AIOKafkaProducer, messages: Sequence[tuple[str, str]]) -> None:
        await self._ensure_topics({self.topic(channel) for channel, _ in messages})
        # Enqueue everything first, then wait: aiokafka batches what is queued.
        sent = [
            await producer.send(self.topic(channel), str(text).encode(), key=channel.encode())
            for channel, text in messages
        ]
        await asyncio.gather(*sent)

    async def next_published(self) -> Event:
        if self._inbox is None:
            raise NotConnected("the kafka transport is not connected")
        return await self._inbox.get()

    # -- internals -----------------------------------------------------------------

    async def _close_clients(self) -> None:
        closers = [
            client.stop()
            for client in (self._consumer, self._lookup, self._producer)
            if client is not None
        ]
        if self._admin is not None:
            closers.append(self._admin.close())
        self._producer = self._consumer = self._lookup = self._admin = None
        for closer in closers:
            # A broker that is away must not hold up shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer, 5)

    async def _ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the topics not known to exist (an existing one is fine)."""
        missing = [topic for topic in topics if topic not in self._known]
        if not missing or self._admin is None:
            return
        response = await self._admin.create_topics(
            [NewTopic(topic, **self._new_topic) for topic in missing]
        )
        for topic, code, *_ in response.topic_errors:
            if code and code != TopicAlreadyExistsError.errno:
                raise for_code(code)(f"creating topic {topic!r}")
            self._known.add(topic)

    async def _sync_assignment(self) -> None:
        """Assign the partitions of every subscribed topic; wait (bounded) for them.

        Partitions kept from the previous assignment resume where they were; new
        ones start at their end. If the broker is away the channels are assigned
        when it comes back; meanwhile subscribers read from the log.
        """
        if self._lock is None:
            raise NotConnected("the kafka transport is not connected")
        async with self._lock:
            try:
                await asyncio.wait_for(self._assign(), self._timeout)
            except (KafkaError, *_TRANSIENT) as exc:
                if not _retriable(exc):
                    raise TransportError(f"Kafka subscription failed: {exc!r}") from exc
                logger.warning("kafka subscription deferred: %r", exc)
                self._up = False

    async def _partitions(self, topics: list[str]) -> tuple[set[TopicPartition], set[str]]:
        """The partitions of ``topics`` and the topics the broker lacks (also a ping).

        Read from fresh metadata each time, so a topic re-created with another
        partition count is noticed.
        """
        assert self._admin is not None
        described = await self._admin.describe_topics(topics)
        wanted: set[TopicPartition] = set()
        missing = set(topics)
        for info in described:
            topic = info["topic"]
            if topic in missing and not info["error_code"]:
                missing.discard(topic)
                wanted.update(TopicPartition(topic, p["partition"]) for p in info["partitions"])
        return wanted, missing

    async def _assign(self) -> None:
        assert self._consumer is not None and self._assigned is not None
        consumer = self._consumer
        topics = sorted(self._channels)
        while True:
            await self._ensure_topics(topics)
            wanted, missing = await self._partitions(topics)
            if not missing:
                break
            # Gone again, or a new topic's metadata still spreading in the cluster.
            self._known -= missing
            await asyncio.sleep(0.1)
        assert self._lookup is not None
        fresh = [tp for tp in wanted if tp not in self._next]
        ends = await self._lookup.end_offsets(fresh) if fresh else {}
        if wanted != consumer.assignment():
            # aiokafka forgets every position on assign(): keep the ones we know.
            kept = {tp: offset for tp, offset in self._next.items() if tp in wanted}
            self._generation += 1
            consumer.assign(list(wanted))
            for tp, offset in kept.items():
                consumer.seek(tp, offset)
            self._next = kept
        # New partitions start at their end as of now: what is published after
        # subscribe() returns is delivered.
        for tp, offset in ends.items():
            consumer.seek(tp, offset)
            self._next[tp] = offset
        if wanted:
            self._assigned.set()
        else:
            self._assigned.clear()

    async def _fetch(self) -> None:
        """Move records from the consumer to the inbox, tracking positions."""
        assert self._consumer is not None and self._inbox is not None
        assert self._assigned is not None
        consumer, inbox = self._consumer, self._inbox
        try:
            while True:
                await self._assigned.wait()
                generation = self._generation
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except KafkaError as exc:
                    if not exc.retriable:
                        raise
                    logger.info("kafka fetch failed, retrying: %r", exc)
                    await asyncio.sleep(0.1)
                    continue
                assigned = consumer.assignment()
                for tp, records in batches.items():
                    if not records:
                        continue
                    after = records[-1].offset + 1
                    if tp in assigned and after > self._next.get(tp, -1):
                        self._next[tp] = after
                        if generation != self._generation:
                            # Fetched across a re-assignment that rewound this
                            # partition: skip what was just delivered.
                            consumer.seek(tp, after)
                    channel = self._channels.get(tp.topic)
                    if channel is None:
                        continue  # unsubscribed meanwhile
                    key = channel.encode()
                    for record in records:
                        # The key names the channel: skip foreign records (or, at
                        # odds of 2**-64, another channel hashed to this topic).
                        if record.key == key and record.value is not None:
                            text = record.value.decode(errors="replace")
                            inbox.put(Event(channel, text))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = TransportError(f"Kafka consumer failed: {exc!r}")
            error.__cause__ = exc
            inbox.fail(error)  # reaches every subscriber via next_published

    async def _watch(self) -> None:
        """Ping the broker; after an outage, restore topics and positions."""
        delay = self._ping_interval
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self._recover(), self._timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._up:
                    logger.warning("kafka broker unreachable; retrying: %r", exc)
                self._up = False
                delay = min(delay * 2, self._max_delay)
                continue
            if not self._up:
                logger.info("kafka broker reachable again")
            self._up = True
            delay = self._ping_interval

    async def _recover(self) -> None:
        assert self._lock is not None and self._consumer is not None
        wanted, missing = await self._partitions(sorted(self._channels))
        async with self._lock:
            if missing or not self._up or wanted != self._consumer.assignment():
                self._known -= missing
                await self._assign()
            # Also after a restart too quick to notice: a broker that lost its data
            # (or a topic deleted and re-created) leaves positions past the end.
            await self._rewind_recreated()

    async def _rewind_recreated(self) -> None:
        """Move positions past a topic's end (a re-created topic) to its start."""
        assert self._consumer is not None and self._lookup is not None
        consumer = self._consumer
        assigned = [tp for tp in consumer.assignment() if tp in self._next]
        if not assigned:
            return
        ends = await self._lookup.end_offsets(assigned)
        stale = [tp for tp in assigned if self._next[tp] > ends[tp]]
        if stale:
            starts = await self._lookup.beginning_offsets(stale)
            for tp in stale:
                consumer.seek(tp, starts[tp])
                self._next[tp] = starts[tp]
