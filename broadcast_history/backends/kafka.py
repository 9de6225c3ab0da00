"""Kafka transport (aiokafka), for ``kafka://host:port[,host:port]`` URLs.

Each channel gets its own topic, created when first used. The consumer has no group
and commits nothing: it starts at the end of a topic when the channel is subscribed,
because history comes from the event log, never from Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, KafkaTimeoutError

from .._cancel import acquire, wait_for
from .._errors import InvalidArgument, NotConnected, TransportError
from .._event import Event
from .._sparse import Sparse
from ._backoff import Backoff
from ._inbox import Inbox, InboxTransport
from ._kafka_topics import PREFIX, TRANSIENT, create_topics, partitions, retriable, topic_for
from ._kafka_topics import bootstrap_servers as _servers
from .base import BroadcastBackend, Health

logger = logging.getLogger("broadcast_history")
#: aiokafka's default max_request_size: the largest record the producer sends.
_MAX_REQUEST = 1_048_576
#: What a record holds besides the envelope: its key (the channel, at most 1,020
#: bytes), varints and the batch header aiokafka counts in its size check.
_RECORD_ROOM = 2048
# Seconds: the least aiokafka request timeout the transport sets (twice its timeout
# otherwise): a topic's creation on a busy cluster may take seconds.
_MIN_REQUEST_TIMEOUT = 10.0
#: Passes a recovery makes at most to assign channels subscribed while it ran.
_REASSIGNS = 3


class KafkaBackend(Health, InboxTransport, BroadcastBackend):
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
        topic_config: Settings of a created topic (``{"retention.ms": "3600000"}``).
        ping_interval: Seconds between liveness checks of the broker.
        max_reconnect_delay: Longest pause, in seconds, between checks of a broker
            that is away.
        timeout: Seconds a publish or a subscribe waits for the broker. aiokafka's
            request timeout is twice that, at least 10 s: a connection gone silent is
            replaced after it.
        client_options: Extra keyword arguments for the aiokafka clients
            (``security_protocol``, ``ssl_context``, ``sasl_*``...).
    """

    crosses_processes = True
    _name = "kafka"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        topic_prefix: str = "bh.",
        num_partitions: int = 1,
        replication_factor: int = 1,
        topic_config: Mapping[str, str] | None = None,
        ping_interval: float = 1.0,
        max_reconnect_delay: float = 5.0,
        timeout: float = 5.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(urls if isinstance(urls, str) else ",".join(urls))
        self._servers = _servers(urls)
        if not PREFIX.fullmatch(topic_prefix):
            raise InvalidArgument(
                f"topic_prefix {topic_prefix!r}: use at most 128 of [a-zA-Z0-9._-]"
            )
        self._prefix = topic_prefix
        self._new_topic: dict[str, Any] = {
            "num_partitions": num_partitions,
            "replication_factor": replication_factor,
            "topic_configs": {key: _setting(value) for key, value in (topic_config or {}).items()},
        }
        self._ping_interval = ping_interval
        self._max_delay = max_reconnect_delay
        self._timeout = timeout
        self._request_timeout = max(2 * timeout, _MIN_REQUEST_TIMEOUT)
        self._options = dict(client_options or {})
        # The producer refuses a larger record before sending anything, and a refused
        # record would fail the live send of the whole batch: larger events travel as
        # notices (their offsets) and subscribers read them from the log.
        self.max_message_size: int | None = _MAX_REQUEST - _RECORD_ROOM
        self._channels: dict[str, str] = {}  # topic -> channel, for subscribed channels
        self._known: set[str] = set()  # topics known to exist
        # Subscribed topics the broker refused to create, that do not exist.
        self._refused: dict[str, KafkaError] = {}
        self._unusable = Sparse(logger, 60.0)
        self._next: dict[TopicPartition, int] = {}  # next offset to deliver per partition
        self._generation = 0  # bumped at each re-assignment
        self._up = False
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._lookup: AIOKafkaConsumer | None = None
        self._lookup_options: dict[str, Any] = {}
        self._inbox: Inbox | None = None
        self._lock: asyncio.Lock | None = None
        self._recovering = False  # _recover holds the lock (see _sync_assignment)
        self._assigned_topics: set[str] = set()  # the topics _assign last took up
        self._assigned: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def topic(self, channel: str) -> str:
        """The topic this transport uses for ``channel``."""
        return topic_for(channel, self._prefix)

    async def connect(self) -> None:
        if self._tasks:
            return
        options = {
            "bootstrap_servers": self._servers,
            # A request unanswered this long closes its connection, and only that ends
            # a connection gone silent: aiokafka's 40 s kept the transport down as long.
            "request_timeout_ms": int(self._request_timeout * 1000),
            **self._options,
        }
        self._producer = AIOKafkaProducer(**options)
        self._consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="latest", **options
        )
        # Offsets are looked up on a connection of their own: on the fetching one they
        # would queue behind the broker's long-poll of the current fetch.
        self._lookup = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **options)
        self._lookup_options = options
        self._admin = AIOKafkaAdminClient(**options)
        try:
            for client in (self._producer, self._consumer, self._lookup, self._admin):
                await wait_for(client.start(), self._timeout * 2)
        except (KafkaError, *TRANSIENT) as exc:
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
        self._refused.clear()
        self._next.clear()
        self._wake_readers()

    async def subscribe(self, channel: str) -> None:
        topic = self.topic(channel)
        self._channels[topic] = channel
        await self._sync_assignment()
        refused = self._refused.get(topic)
        if refused is not None:
            raise TransportError(f"Kafka subscription failed: {refused!r}") from refused

    async def unsubscribe(self, channel: str) -> None:
        self._channels.pop(self.topic(channel), None)
        await self._sync_assignment()

    async def publish_many(self, messages: Sequence[tuple[str, str]]) -> None:
        producer = self._producer
        if producer is None:
            raise NotConnected("the kafka transport is not connected")
        if not self._up:
            # Known away: a send would only wait. Failed at once, it counts as any
            # send not made (skipped quietly, it counted as one that worked: "live
            # sends work again" was logged in the middle of an outage).
            raise TransportError("the kafka broker is unreachable: live send not made")
        topics = [self.topic(channel) for channel, _ in messages]
        stage = _Stage()
        try:
            await wait_for(self._send(producer, messages, topics, stage), self._timeout)
        except (KafkaError, *TRANSIENT) as exc:
            # These topics may be gone (with a broker that lost its data): created
            # again by the next send. Forgetting every topic made the next batch
            # create them all again, and time out again as the set grew.
            self._known.difference_update(topics)
            # A slow or failed topic creation is not an outage: taken for one, it
            # paused the live sends of every channel until the watch's next ping.
            # If the broker is away, that ping finds it.
            if retriable(exc) and not stage.creating:
                self._up = False
            raise TransportError(f"Kafka send failed: {exc!r}") from exc

    async def _send(
        self,
        producer: AIOKafkaProducer,
        messages: Sequence[tuple[str, str]],
        topics: Sequence[str],
        stage: _Stage,
    ) -> None:
        # Enqueue everything first, then wait: aiokafka batches what is queued. Topics
        # known to exist go first: creating new ones (one request for all of them,
        # which a broker may take seconds over) must not hold up or, timing out,
        # drop the sends of channels in use; what is enqueued goes out regardless.
        # Split once, before any wait: subscribes and recoveries change the known set
        # meanwhile, and a topic it gained or lost would be sent twice or not at all.
        known = [topic in self._known for topic in topics]
        sent = [
            await producer.send(topic, str(text).encode(), key=channel.encode())
            for (channel, text), topic, exists in zip(messages, topics, known, strict=True)
            if exists
        ]
        new = [index for index, exists in enumerate(known) if not exists]
        refused: dict[str, KafkaError] = {}
        if new:
            stage.creating = True
            refused = await self._ensure_topics({topics[index] for index in new})
            stage.creating = False
            for index in new:
                if topics[index] in refused:
                    continue
                channel, text = messages[index]
                payload = str(text).encode()
                sent.append(await producer.send(topics[index], payload, key=channel.encode()))
        await asyncio.gather(*sent)
        if refused:  # the others went out
            raise next(iter(refused.values()))

    # -- internals -----------------------------------------------------------------

    async def _close_clients(self) -> None:
        # Each client's close, and the network client under it.
        closers: list[tuple[Coroutine[Any, Any, None], Any]] = [
            (_stop_consumer(consumer), getattr(consumer, "_client", None))
            for consumer in (self._consumer, self._lookup)
            if consumer is not None
        ]
        if self._producer is not None:
            closers.append((self._producer.stop(), getattr(self._producer, "client", None)))
        if self._admin is not None:
            closers.append((self._admin.close(), None))
        self._producer = self._consumer = self._lookup = self._admin = None
        # Each closer a task of its own: aiokafka's consumer, stopped after the broker
        # died, raises the cancellation of its own fetch task, which asyncio.wait does
        # not pass on (it raises only if this task is cancelled). A broker that is away
        # must not hold up shutdown: CLOSE_WAIT each at most.
        tasks = [(asyncio.ensure_future(closer), client) for closer, client in closers]
        for task, _ in tasks:
            task.add_done_callback(_closed)
        try:
            for task, client in tasks:
                done, _ = await asyncio.wait({task}, timeout=CLOSE_WAIT)
                if not done and client is not None:
                    # Cut short (a producer still flushing to a dead broker): its
                    # client's metadata task would go on retrying after disconnect.
                    task.cancel()
                    closing = asyncio.ensure_future(client.close())
                    closing.add_done_callback(_closed)
                    await asyncio.wait({closing}, timeout=1)
        finally:
            for task, _ in tasks:
                task.cancel()

    async def _ensure_topics(self, topics: Iterable[str]) -> dict[str, KafkaError]:
        """Create the topics not known to exist (an existing one is fine); returns
        those the broker refused to create and that do not exist, with its error."""
        if self._admin is None:
            return {}
        return await create_topics(self._admin, topics, self._known, **self._new_topic)

    async def _sync_assignment(self) -> None:
        """Assign the partitions of every subscribed topic; wait (bounded) for them.

        Partitions kept from the previous assignment resume where they were; new
        ones start at their end. If the broker is away the channels are assigned
        when it comes back; meanwhile subscribers read from the log.
        """
        if self._lock is None:
            raise NotConnected("the kafka transport is not connected")
        if not self._up and not self._recovering:
            # Known to be away: _watch assigns every channel when it comes back.
            # Trying here waited the whole timeout under the lock, so many
            # subscribers entered one timeout after another.
            return
        # Bounded: a recovery holds the lock until its requests end, and a silent
        # connection's end is aiokafka's request timeout.
        if not await acquire(self._lock, self._timeout):
            # That recovery assigns this channel too before the transport is up.
            logger.debug("kafka subscription deferred to the recovery under way")
            return
        try:
            if not self._up:  # found away while this one waited for the lock
                return
            await wait_for(self._assign(), self._timeout)
        except (KafkaError, *TRANSIENT) as exc:
            if not retriable(exc):
                raise TransportError(f"Kafka subscription failed: {exc!r}") from exc
            logger.warning("kafka subscription deferred: %r", exc)
            self._up = False
        finally:
            self._lock.release()

    async def _assign(self) -> None:
        assert self._consumer is not None and self._assigned is not None
        consumer = self._consumer
        topics = sorted(self._channels)
        self._assigned_topics = set(topics)
        while True:
            # A topic this client may not create and that is not there (an operator
            # deleted it) is left out: taken for an outage, it stopped the live
            # sends of every channel. Its subscribers read the log meanwhile.
            self._refused = await self._ensure_topics(topics)
            for error in self._refused.values():
                self._unusable.warning("kafka topic left out: %s", error)
            topics = [topic for topic in topics if topic not in self._refused]
            assert self._admin is not None
            wanted, missing = await partitions(self._admin, topics)
            if not missing:
                break
            # Gone again, or a new topic's metadata still spreading in the cluster.
            self._known -= missing
            await asyncio.sleep(0.1)
        fresh = [tp for tp in wanted if tp not in self._next]
        ends = await self._offsets(fresh) if fresh else {}
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
            inbox.broke("the Kafka consumer", exc)  # reaches every subscriber

    async def _watch(self) -> None:
        """Ping the broker; after an outage, restore topics and positions."""
        # Pings at the ping interval while the broker answers, less often while not.
        backoff = Backoff(self._max_delay, first=self._ping_interval)
        while True:
            await backoff.sleep()
            ping = asyncio.ensure_future(self._recover())
            try:
                await asyncio.wait({ping}, timeout=self._timeout)
                if not ping.done():
                    self._went_away(TimeoutError(f"no answer in {self._timeout} s"))
                    # Not cancelled: only aiokafka's request timeout closes a
                    # connection gone silent (a NAT or firewall that forgot it, a
                    # frozen host), and a cancelled request never times out: the
                    # dead connection stayed, and every later ping waited in it.
                    # Bounded all the same, well past the requests' own timeouts.
                    await asyncio.wait({ping}, timeout=4 * self._request_timeout)
                    if not ping.done():
                        ping.cancel()
                        continue
                await ping
            except asyncio.CancelledError:
                ping.cancel()
                raise
            except Exception as exc:
                self._went_away(exc)
                continue
            backoff.reset()

    def _went_away(self, exc: BaseException) -> None:
        if self._up:
            logger.warning("kafka broker unreachable; retrying: %r", exc)
        self._up = False

    async def _recover(self) -> None:
        assert self._lock is not None and self._consumer is not None and self._admin is not None
        wanted, missing = await partitions(self._admin, sorted(self._channels))
        async with self._lock:
            # Subscribes now wait for this (see _sync_assignment): one that returned
            # at once could add a channel after _assign read them, and go unassigned
            # while the transport said it was up.
            self._recovering = True
            try:
                await self._restore(wanted, missing)
            finally:
                self._recovering = False

    async def _restore(self, wanted: set[TopicPartition], missing: set[str]) -> None:
        assert self._consumer is not None
        if missing or not self._up or wanted != self._consumer.assignment():
            self._known -= missing
            await self._assign()
        # Also after a restart too quick to notice: a broker that lost its data
        # (or a topic deleted and re-created) leaves positions past the end.
        await self._rewind_recreated()
        # Subscribes that gave up waiting for the lock; a few passes at most (channels
        # changing faster than a pass would hold the recovery for ever): the next
        # ping assigns what is left, a ping interval later.
        for _ in range(_REASSIGNS):
            if self._assigned_topics == set(self._channels):
                break
            await self._assign()
        # Under the lock: a subscribe that waited for it assigns its channel.
        self._back_up("kafka broker connection")

    async def _rewind_recreated(self) -> None:
        """Move positions past a topic's end (a re-created topic) to its start."""
        assert self._consumer is not None
        consumer = self._consumer
        assigned = [tp for tp in consumer.assignment() if tp in self._next]
        if not assigned:
            return
        ends = await self._offsets(assigned)
        stale = [tp for tp in assigned if self._next[tp] > ends[tp]]
        if stale:
            starts = await self._offsets(stale, ends=False)
            for tp in stale:
                consumer.seek(tp, starts[tp])
                self._next[tp] = starts[tp]

    async def _offsets(
        self, partitions: list[TopicPartition], *, ends: bool = True
    ) -> dict[TopicPartition, int]:
        """The end (or start) offsets of ``partitions``, from the lookup client."""
        lookup = self._lookup
        assert lookup is not None
        try:
            lookup_offsets = lookup.end_offsets if ends else lookup.beginning_offsets
            offsets: dict[TopicPartition, int] = await lookup_offsets(partitions)
            return offsets
        except KafkaTimeoutError:
            # aiokafka times an offset lookup out before its request, so the request
            # never times out and its connection is never closed: gone silent, the
            # connection failed every later lookup. A new client connects afresh.
            await self._renew_lookup(lookup)
            raise

    async def _renew_lookup(self, old: AIOKafkaConsumer) -> None:
        """Replace the look-up client ``old``; it stays in use until a new one starts
        (stopped first, it stayed in use, reconnecting, and was never closed)."""
        new = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self._lookup_options)
        try:
            await wait_for(new.start(), self._timeout * 2)
        except BaseException as exc:
            with suppress(Exception):
                await _stop_consumer(new)
            if isinstance(exc, Exception):
                logger.debug("a new kafka look-up client did not start: %r", exc)
                return  # the next look-up that times out tries again
            raise
        if self._lookup is not old:  # disconnected (or replaced) meanwhile
            await _stop_consumer(new)
            return
        self._lookup = new
        closing = asyncio.ensure_future(_stop_consumer(old))
        closing.add_done_callback(_closed)
        await asyncio.wait({closing}, timeout=5)


__all__ = ["KafkaBackend", "topic_for"]


#: Longest wait, in seconds, for each client's close at disconnect.
CLOSE_WAIT = 5.0


@dataclass
class _Stage:
    """How far one send got: read when it failed or timed out."""

    creating: bool = False


def _setting(value: object) -> str:
    """A topic setting as Kafka reads it (``true``, not Python's ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _closed(task: asyncio.Future[Any]) -> None:
    """A client's close ended: its failure is only worth a debug line."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("closing a kafka client failed: %r", task.exception())


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except BaseException:
        # Stopped after the broker died, aiokafka's consumer raises its fetch task's
        # cancellation before it closes its client (connections, metadata task).
        client = getattr(consumer, "_client", None)
        if client is not None:
            await client.close()
        raise
