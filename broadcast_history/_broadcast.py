"""The :class:`Broadcast` façade: publish durably, subscribe with catch-up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ._appender import Appender
from ._budget import SubscriberOptions, weigh
from ._channels import Channels
from ._consumer import DEFAULT_LEASE
from ._errors import (
    BroadcastError,
    InvalidArgument,
    LogUnavailable,
    NotConnected,
    TransportError,
)
from ._event import Event
from ._heads import HeadProbe
from ._leases import Leases, check_consumer_options
from ._serial import FORGET_WAIT, Serial
from ._sparse import Sparse
from ._stats import Stats, failure_reason
from ._subscriber import Subscriber
from ._validation import (
    DEFAULT_MAX_MESSAGE_SIZE,
    check_channel,
    check_int,
    check_key,
    check_message,
    check_position,
)
from ._wire import Wire, require_shared_log
from .backends import BroadcastBackend, backend_from_url
from .log import EventLog, Pending, Retention

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry
    from typing_extensions import Self

logger = logging.getLogger("broadcast_history")
#: A retention pass waits this many times as long as the shortest of the last three
#: searches for channels took, at least ``Retention.interval``, at most
#: RETENTION_SPACING_MAX seconds.
RETENTION_SPACING = 20
RETENTION_SPACING_MAX = 60.0


class Broadcast:
    """Publish/subscribe over a live transport, with every event kept in a log.

    Args:
        url: Live transport URL: ``memory://`` (default), ``redis://``,
            ``redis-stream://``, ``postgres://`` or ``kafka://``.
        backend: A transport instance instead of ``url`` (any ``BroadcastBackend``).
        log: The event log: a database URL or an :class:`EventLog`. Default: a
            private in-memory SQLite database.
        retention: How much history to keep per channel (default: everything).
        max_message_size: Largest message accepted by ``publish``, in bytes.
        migrate: Create or upgrade the log schema on connect (the default for a
            ``log`` given by URL); ``False`` only checks it and raises
            :class:`SchemaOutOfDate` if it is not current; ``"create"`` creates it
            in an empty database but never upgrades one. For a ``log`` given as an
            :class:`EventLog`, pass it to that instead.
        buffer_size: Live events a subscriber may have waiting before it falls back
            to reading the log at its own pace.
        page_size: Events read from the log per query during replay.
        idle_check: Seconds without live traffic after which a subscriber checks the
            log for events the transport did not deliver.
        reorder_window: Seconds a subscriber waits for out-of-order events to fill a
            hole before it reads the hole from the log.
        max_batch: Most publishes committed in one transaction.
        buffer_bytes: Bytes of live events a subscriber may have waiting (besides
            ``buffer_size``) before it falls back to reading the log.
        page_bytes: Payload bytes read from the log per replay page (a page always
            holds at least one event).
        metrics: Export Prometheus metrics (the ``metrics`` extra): ``True`` in the
            default registry, or in the ``CollectorRegistry`` given.

    Raises:
        InvalidArgument: The transport reaches other processes and no ``log`` was
            given: each process would keep a private log of its own; or an option is
            out of range (``max_message_size`` below 1, ``buffer_size`` below 1...),
            or ``migrate`` differs from that of the :class:`EventLog` given.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        backend: BroadcastBackend | None = None,
        log: str | EventLog | None = None,
        retention: Retention | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        migrate: bool | Literal["create"] | None = None,
        buffer_size: int = 10_000,
        page_size: int = 1000,
        idle_check: float = 1.0,
        reorder_window: float = 0.05,
        max_batch: int = 1000,
        buffer_bytes: int = 16 * 1024 * 1024,
        page_bytes: int = 4 * 1024 * 1024,
        metrics: bool | CollectorRegistry = False,
    ) -> None:
        # Kept to build the transport anew after its event loop ended (see _forget).
        self._url = (url or "memory://") if backend is None else None
        if backend is None:
            backend = backend_from_url(url or "memory://")
        elif url is not None:
            raise InvalidArgument("give url or backend, not both")
        # None: not given (True for a URL; an EventLog keeps its own). Any value given
        # with an EventLog must be its own: an explicit True was once ignored.
        if isinstance(log, EventLog) and migrate is not None and migrate != log.migrate:
            raise InvalidArgument(
                "migrate= applies to a log given by URL: pass it to the EventLog "
                f"instead (EventLog(url, migrate={migrate!r}))"
            )
        self._backend = backend
        # The transport in use, for the metrics collector, which must not hold the
        # broadcast (the transport is made anew after an event loop ends).
        self._transport: list[BroadcastBackend] = [backend]
        #: The event log every publish is stored in.
        self.log: EventLog = (
            log
            if isinstance(log, EventLog)
            else EventLog(log, migrate=True if migrate is None else migrate)
        )
        if self.log.private:
            require_shared_log(backend, url)
        if retention is not None and not isinstance(retention, Retention):
            # A dict or a number from a config file: retention would be off silently.
            raise InvalidArgument(
                f"retention must be a Retention(max_events=..., max_age=...), got {retention!r}"
            )
        self.retention: Retention | None = retention
        # 0 or less took nothing from the queue: publish() and disconnect() hung.
        check_int("max_batch", max_batch, minimum=1)
        self.max_message_size: int = check_int("max_message_size", max_message_size, minimum=1)
        self._options = SubscriberOptions(
            buffer_size, page_size, idle_check, reorder_window, buffer_bytes, page_bytes
        )
        self._wire = Wire(backend, self.log)
        self._wire.deliver_locally(self._dispatch)
        #: What this broadcast counted so far (published, delivered, fallbacks...).
        self.stats: Stats = Stats()
        self._appender = Appender(self.log, self._wire, self.stats, max_batch=max_batch)
        self._channels = Channels(backend)
        self._subscribers = self._channels.subscribers
        self._heads = HeadProbe(self.log, self._subscribers)
        self._leases = Leases(self.log)
        self._listener: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._lags_task: asyncio.Task[None] | None = None
        self._listener_error: BaseException | None = None
        self._connected = False
        self._serial = Serial()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one connect() ran in
        # The closing under way (see disconnect), awaited by every caller.
        self._closing: asyncio.Future[None] | None = None
        #: Transport messages ignored, by kind: ``"not_envelope"`` (another program
        #: publishing) or ``"other_log"`` (a process with another log).
        self.foreign_messages: dict[str, int] = self._wire.foreign
        #: The Prometheus registry this broadcast's metrics are in (``None``: none).
        self.metrics_registry: CollectorRegistry | None = None
        if metrics:
            from ._metrics import register

            self.metrics_registry = register(self, None if metrics is True else metrics)

    @property
    def backend(self) -> BroadcastBackend:
        """The live transport."""
        return self._backend

    @property
    def connected(self) -> bool:
        """Whether ``connect`` has run (and ``disconnect`` not yet)."""
        return self._connected

    @property
    def transport_connected(self) -> bool:
        """Whether the live transport is up; when down, subscribers read from the log.

        False too while live sends fail (until one works, the transport reconnects, or
        30 s pass with no send; sends failing on and off, from when half of the last
        8 fail while an eighth of the last 32 do, until 30 s pass with none failing): a
        process that only publishes has no subscription to tell it of an outage.
        """
        up = getattr(self._backend, "connected", True)  # broadcaster's backends lack it
        sending = not self._appender.sends_failing
        return self._connected and self._listener_error is None and bool(up) and sending

    # -- lifecycle -----------------------------------------------------------------

    async def connect(self) -> None:
        """Open the log (creating its schema) and the transport; safe to call twice.

        Raises:
            LogUnavailable: The log could not be opened (a database restarting, too).
            TransportError: The transport could not be reached. Both may pass: a
                later ``connect()`` of the same broadcast tries again.
        """
        async with self._serial():  # a second connect() meanwhile waits for this one
            # A disconnect still closing (perhaps begun while this call waited for
            # the lock): let it end first (its error was its callers').
            while self._closing is not None:
                await asyncio.wait({self._closing})
            if self._loop_ended():
                await self._forget()
            if not self._connected:
                await self._open()

    async def _open(self) -> None:
        await self.log.connect()
        try:
            await self._backend.connect()
        except BaseException:
            await self.log.disconnect()
            raise
        self._channels.open()
        # Its semaphore and cached lookups belong to one event loop: anew for each.
        self._heads = HeadProbe(self.log, self._subscribers)
        self._loop = asyncio.get_running_loop()
        self._listener_error = None
        self._listener = asyncio.create_task(self._listen(), name="broadcast-history-listen")
        self._appender.start()
        if self.retention is not None:
            self._retention_task = asyncio.create_task(
                self._retain(self.retention), name="broadcast-history-retention"
            )
        if self.metrics_registry is not None:
            from ._metrics import keep_lags_fresh

            self._lags_task = asyncio.create_task(keep_lags_fresh(self.metrics_registry))
        self._connected = True

    async def disconnect(self) -> None:
        """Finish pending publishes, end subscriptions, close everything; idempotent.

        Cancelling it (a shutdown timeout) does not stop the closing halfway, which
        would leave tasks, threads and connections behind: it goes on, and a later
        ``disconnect()`` or ``connect()`` waits for it.
        """
        closing = self._closing
        if closing is None and self._loop_ended():
            async with self._serial():
                if self._loop_ended():
                    await self._forget()
            return
        if closing is None:
            if not self._connected:
                return
            self._connected = False
            closing = self._closing = asyncio.ensure_future(self._close())
            closing.add_done_callback(self._closed)
        await asyncio.shield(closing)

    def _closed(self, closing: asyncio.Future[None]) -> None:
        self._closing = None
        if not closing.cancelled():
            closing.exception()  # raised to the callers still waiting; not "never retrieved"

    async def _close(self) -> None:
        await self._appender.stop()
        for task in (self._listener, self._retention_task, self._lags_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._listener = self._retention_task = self._lags_task = None
        self._channels.close()
        try:
            await self._leases.close()
            await self._backend.disconnect()
        finally:
            await self.log.disconnect()

    def _loop_ended(self) -> bool:
        """Whether this broadcast is connected in an event loop that has since ended."""
        return self._connected and self._loop is not None and self._loop.is_closed()

    async def _forget(self) -> None:
        """Drop what a loop that ended without ``disconnect()`` left connected.

        Its tasks ended with it (``asyncio.run`` cancels them); nothing of it can be
        awaited any more. Connections are closed where they allow it from this loop.
        """
        logger.warning(
            "this broadcast was connected in an event loop that ended without "
            "disconnect(): its subscriptions and connections are dropped"
        )
        self._connected = False
        self._appender.forget()
        self._listener = self._retention_task = self._lags_task = None
        self._channels.forget()
        self._leases.forget()
        try:
            await asyncio.wait_for(self._backend.disconnect(), FORGET_WAIT)
        except Exception as exc:  # bound to the loop that ended: left to the collector
            logger.debug("closing the transport after its loop ended failed: %r", exc)
        if self._url is not None:
            # Its clients, tasks and locks may still belong to the loop that ended
            # (a disconnect that failed halfway): a new one starts clean.
            backend = backend_from_url(self._url)
            old = self._backend
            self._backend = self._wire.backend = self._channels.backend = backend
            self._transport[0] = backend
            # transport_reconnects_total is a counter: the old transport's count stays.
            # Added after the swap: a scrape between the two may miss it once, never
            # count it twice (a counter that fell back would read as a reset).
            self.stats.replaced_reconnects += int(getattr(old, "reconnects", 0))
        await self.log.disconnect()  # which drops a store of the loop that ended

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # -- publish -------------------------------------------------------------------

    async def publish(self, channel: str, message: str | bytes, *, key: str | None = None) -> Event:
        """Store ``message`` in the log, send it live, and return the stored event.

        Returns only once the event is committed. With ``key``, a second publish of
        the same key on the same channel stores nothing and returns the first event.

        Raises:
            InvalidArgument: Bad channel name or key.
            InvalidMessage: ``message`` is neither ``str`` nor ``bytes``.
            MessageTooLarge: ``message`` is over ``max_message_size``.
            LogUnavailable: The log could not store it, or cannot tell whether it
                did (the message says "may or may not be stored": the connection
                failed during the append, or no answer came in time; publish again
                with the same ``key``). Either way nothing was sent live.
            NotConnected: The broadcast is not connected.
        """
        try:
            check_channel(channel)
            payload = check_message(message, self.max_message_size)
            check_key(key)
            self._check_connected()
            future = self._appender.submit(Pending(channel, payload, key))
        except BroadcastError as exc:
            self.stats.failures[failure_reason(exc)] += 1
            raise
        return await future

    def _check_connected(self) -> None:
        if not self._connected:
            raise NotConnected("call connect() (or use `async with broadcast`) first")
        if self._loop_ended():
            raise NotConnected(
                "the event loop this broadcast was connected in has ended: "
                "call connect() again in this one"
            )
        if asyncio.get_running_loop() is not self._loop:
            # Its tasks and futures live in that loop: a publish from another one was
            # stored, and its caller never woken.
            raise NotConnected(
                "this broadcast was connected in another event loop: await it there "
                "(from another thread, with asyncio.run_coroutine_threadsafe)"
            )

    # -- subscribe -----------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        channel: str,
        *,
        since: int | datetime | None = None,
        history: int | None = None,
        epoch: int | None = None,
        consumer: str | None = None,
        auto_commit: float | None = None,
        wait: bool = True,
        lease: float = DEFAULT_LEASE,
    ) -> AsyncIterator[Subscriber]:
        """Subscribe to ``channel``: history from a start position, then live.

        Args:
            since: Offset (events after it) or aware datetime (events at or after it).
            history: The last ``history`` events, then live.
            epoch: The epoch ``since`` belongs to; a different current epoch raises
                :class:`StreamReset`.
            consumer: A durable consumer's name: its position is kept in the log
                (``sub.commit()``; a stored one wins over ``since``/``history``), and
                one subscription at a time holds it across processes (its lease).
            auto_commit: Commit every this many seconds (at least 0.01), and at a normal end.
            wait: Wait while another process holds ``consumer``, or raise.
            lease: Seconds a hold on ``consumer`` lasts unless renewed (0.1 s to a
                week).

        Raises:
            OffsetOutOfRange: ``since`` is negative or beyond the head.
            HistoryTruncated: Events after ``since`` were removed by retention.
            StreamReset: ``epoch`` is not the channel's current epoch.
            ConsumerBusy: ``wait=False`` and another process holds ``consumer``.
        """
        check_channel(channel)
        check_position(since, history, epoch)
        check_consumer_options(consumer, auto_commit, wait, lease)
        self._check_connected()
        if consumer is not None:
            start, hold = (since, history, epoch), (auto_commit, wait, lease)
            async with self._leases.subscription(
                self.subscribe, channel, consumer, start, hold
            ) as sub:
                yield sub
            return
        subscriber = Subscriber(channel, self.log, self._options, self._heads, self.stats)
        if self._listener_error is not None:
            subscriber._fail(self._listener_error)
        await self._channels.attach(subscriber)
        try:
            # Registered first, positioned second: whatever commits in between is
            # either buffered live or read from the log, so nothing falls between.
            await subscriber._start(since, history, epoch)
            yield subscriber
        finally:
            await self._channels.detach(subscriber, connected=self._connected)

    def subscriber_modes(self) -> dict[str, int]:
        """How many subscriptions are open, by mode: ``"live"`` or ``"replay"``."""
        return self._channels.modes()

    # -- background tasks ----------------------------------------------------------

    def _dispatch(self, channel: str, events: Sequence[Event]) -> None:
        """Feed live ``events`` of ``channel`` to its subscribers in this process."""
        targets = self._subscribers.get(channel)
        if targets:
            size = weigh(events)
            for subscriber in tuple(targets):
                subscriber._feed(events, size)

    async def _listen(self) -> None:
        wire = self._wire
        subscribers = self._subscribers
        dispatch = self._dispatch
        try:
            while True:
                channel, events = await wire.receive(subscribers)
                dispatch(channel, events)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Every subscriber hears of it; none is left waiting forever.
            error = exc
            if not isinstance(exc, TransportError):
                error = TransportError(f"the live transport failed: {exc!r}")
                error.__cause__ = exc
            self._listener_error = error
            for group in subscribers.values():
                for subscriber in group:
                    subscriber._fail(error)
            if not isinstance(exc, Exception):
                raise

    async def _retain(self, retention: Retention) -> None:
        # Finding what is due reads every channel row, and channel rows outlive their
        # events (a million per-user channels: 0.1-0.5 s of the database's time a
        # pass, in every process): passes are spaced out so that searching takes at
        # most 1/RETENTION_SPACING of the time. By the shortest of the last searches,
        # so that one stalled by something else does not put retention off for long.
        searches: deque[float] = deque(maxlen=3)
        failures = Sparse(logger, 30.0)  # this broadcast's, not hidden by another's
        wait = retention.interval
        while True:
            await asyncio.sleep(wait)
            started = time.monotonic()
            try:
                done = await self.log.retention_pass(retention)
            except Exception as exc:
                # One line now and then: a log away for a minute is not 60 tracebacks;
                # anything else is a bug, and keeps its traceback (where).
                bug = not isinstance(exc, LogUnavailable)
                failures.warning("retention pass failed: %s", exc, exc_info=bug)
                searches.append(time.monotonic() - started)  # failing may be as slow
            else:
                searches.append(done.searching)
            spaced = min(searches) * RETENTION_SPACING
            wait = max(retention.interval, min(spaced, RETENTION_SPACING_MAX))
