"""Group commit: concurrent publishes share one transaction and one live send."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._budget import weigh, weight
from ._cancel import wait_for
from ._errors import InvalidArgument, LogUnavailable, NotConnected
from ._event import Event
from ._stats import Stats
from ._wire import Wire
from .log import EventLog, Pending

logger = logging.getLogger("broadcast_history")

#: Longest a live send may take: a stalled transport must not hold the send task (and
#: every later event's live delivery) for ever. Subscribers read what it lost from
#: the log.
SEND_TIMEOUT = 10.0
#: Longest ``disconnect`` waits for the last live sends.
STOP_SEND_WAIT = 5.0
#: How long a failed live send counts as "the transport is down" when nothing is
#: sent after it (a process that publishes rarely), and how long after a run of
#: failures one more still belongs to it (sends failing on and off).
FAILURE_MEMORY = 30.0
#: Most events, and message bytes, waiting for a live send; past either the oldest
#: are not sent live (their subscribers find them in the log), so a stalled
#: transport cannot fill memory.
MAX_OUTBOX = 100_000
MAX_OUTBOX_BYTES = 64 * 1024 * 1024
_FAILURES_LOGGED_EVERY = 100
#: Sends failing on and off become "failing" when at least half of the last
#: _RECENT_SENDS failed (or the last failed and none worked for _NONE_WORKED seconds),
#: and stay so while more than an eighth of the last _RECENT_SENDS_UP fail: a third
#: of the sends failing (one cluster master of three down) said up and down by turns.
_RECENT_SENDS = 8
_RECENT_SENDS_UP = 32
_NONE_WORKED = 5.0


class Appender:
    """Batches publishes into log transactions, then sends the events on the wire.

    Whatever is waiting when a transaction starts goes into it: there is no timer, so
    a lone publisher pays one transaction and many publishers share them. Live sends
    run in a second task, so batch N is sent while batch N+1 commits; they stay in
    commit order. This process's own subscribers get each batch when it commits,
    whatever the transport does; a transport only this broadcast reads (``private``)
    gets nothing.
    """

    def __init__(self, log: EventLog, wire: Wire, stats: Stats, *, max_batch: int = 1000) -> None:
        self._log = log
        self._wire = wire
        self._stats = stats
        self._max_batch = max_batch
        self._pending: deque[tuple[Pending, asyncio.Future[Event]]] = deque()
        self._outbox: deque[Event] = deque()
        self._outbox_bytes = 0
        self._dropping = False  # warned that the transport is behind, until it catches up
        #: Live sends that failed in the current run of failures (0: none).
        self.failing_sends = 0
        # The transport's reconnection count when that run of failures began, and
        # the time (time.monotonic) of the last failure.
        self._failed_at = 0
        self._failed_last = 0.0
        # A send worked since the run began (said once in the log); one failed again
        # after that (sends fail on and off: a cluster with one shard down); and the
        # last sends' outcomes since (True: failed).
        self._recovered = self._flapping = False
        self._recent: deque[bool] = deque(maxlen=_RECENT_SENDS_UP)
        # What the last sends say (see _judge), and whether the last one failed;
        # plain attributes, read by metrics scrapes from another thread.
        self._on_off_down = self._last_failed = False
        self._worked_last = 0.0  # time.monotonic of the last send that worked
        self._has_pending: asyncio.Event | None = None
        self._has_outbox: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._drained = False

    def start(self) -> None:
        self._closing = self._drained = False
        self._end_run()
        self._has_pending = asyncio.Event()
        self._has_outbox = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._commit_loop(), name="broadcast-history-append"),
            asyncio.create_task(self._send_loop(), name="broadcast-history-send"),
        ]

    async def stop(self) -> None:
        """Commit and send what was submitted, then stop both tasks."""
        if not self._tasks:
            return
        commit_task, send_task = self._tasks
        self._tasks = []
        self._closing = True
        assert self._has_pending is not None
        assert self._has_outbox is not None
        self._has_pending.set()
        await asyncio.gather(commit_task, return_exceptions=True)
        self._drained = True
        self._has_outbox.set()
        # What is still unsent after a short wait is in the log already: a stalled
        # transport must not make a shutdown wait a whole SEND_TIMEOUT.
        await asyncio.wait({send_task}, timeout=STOP_SEND_WAIT)
        send_task.cancel()
        await asyncio.gather(send_task, return_exceptions=True)
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(NotConnected("the broadcast disconnected"))

    def forget(self) -> None:
        """Drop the state of an event loop that ended (its tasks and futures with it)."""
        self._tasks = []
        self._pending.clear()
        self._outbox.clear()
        self._outbox_bytes = 0
        self._has_pending = self._has_outbox = None

    def submit(self, item: Pending) -> asyncio.Future[Event]:
        """Queue ``item``; the future resolves once its batch committed."""
        if self._closing or self._has_pending is None:
            raise NotConnected("the broadcast is not connected")
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._has_pending.set()
        return future

    async def _commit_loop(self) -> None:
        assert self._has_pending is not None
        assert self._has_outbox is not None
        pending = self._pending
        while await _filled(pending, self._has_pending, lambda: self._closing):
            size = min(len(pending), self._max_batch)
            batch = [pending.popleft() for _ in range(size)]
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise

    async def _commit(self, batch: list[tuple[Pending, asyncio.Future[Event]]]) -> None:
        """Append ``batch`` and settle its futures; hand what was stored to this
        broadcast's subscribers and queue it for sending (unless the transport is
        private)."""
        assert self._has_outbox is not None
        stats = self._stats
        started = time.perf_counter()
        try:
            events = await self._log.append([item for item, _ in batch])
        except InvalidArgument as exc:
            if len(batch) == 1:
                stats.failures["invalid"] += 1
                _settle(batch[0][1], exc)
                return
            # The log refused the batch's data, so nothing of it was stored. Every
            # publish was checked before it was queued, so this is rare; committing
            # the items one at a time fails only the guilty one.
            logger.warning("a batch of %d was refused (%s): committing one by one", len(batch), exc)
            for entry in batch:
                await self._commit([entry])
                # A log that commits small batches without suspending (SQLite on the
                # loop) would otherwise hold the loop for up to max_batch commits.
                await asyncio.sleep(0)
            return
        except Exception as exc:
            # Nothing of this batch was committed, so nothing of it is sent.
            reason = "log_unavailable" if isinstance(exc, LogUnavailable) else "other"
            stats.failures[reason] += len(batch)
            for _, future in batch:
                _settle(future, exc)
            return
        stats.commit_seconds.observe(time.perf_counter() - started)
        stats.batch_size.observe(len(batch))
        stats.publishes += len(batch)
        for (_, future), event in zip(batch, events, strict=True):
            if not future.done():
                future.set_result(event)
        self._wire.hand_over(events)
        if not self._wire.sends:
            return  # nobody else reads the transport: the hand-over was the delivery
        outbox = self._outbox
        outbox.extend(events)
        self._outbox_bytes += weigh(events)
        if len(outbox) > MAX_OUTBOX or self._outbox_bytes > MAX_OUTBOX_BYTES:
            dropped = 0
            while len(outbox) > MAX_OUTBOX or self._outbox_bytes > MAX_OUTBOX_BYTES:
                self._outbox_bytes -= weight(outbox.popleft())
                dropped += 1
            stats.live_send_failures += 1
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "the transport is not keeping up: events are not sent live until it "
                    "does (%d so far; subscribers read them from the log)",
                    dropped,
                )
        self._has_outbox.set()

    async def _send_loop(self) -> None:
        assert self._has_outbox is not None
        outbox = self._outbox
        while await _filled(outbox, self._has_outbox, lambda: self._drained):
            # Woken by a commit whose publishers are publishing again: let the next
            # batch go to the log first, and encode and send this one while it commits.
            await asyncio.sleep(0)
            events = list(outbox)
            outbox.clear()
            self._outbox_bytes = 0
            try:
                await wait_for(self._wire.send(events), SEND_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                self._failed(f"live send of {len(events)} events took over {SEND_TIMEOUT:g} s")
            except Exception as exc:
                # The events are durable; subscribers find them in the log.
                self._failed(f"live send of {len(events)} events failed", exc)
            else:
                self._dropping = False
                if self.failing_sends:
                    self._worked()

    @property
    def sends_failing(self) -> bool:
        """Whether live sends are failing now: one failed less than
        :data:`FAILURE_MEMORY` ago, the transport has not reconnected since (a
        reconnection says it works again before the next send can), and either none
        has worked since the failures began or they fail on and off.

        On and off (a cluster with one shard down) counts as failing while at least
        half of the last 8 sends since the first that worked failed (or the last one
        did and none worked for a few seconds), and goes on failing while more than
        an eighth of the last 32 fail, until FAILURE_MEMORY passes with no failure:
        it said up and down by turns, batch after batch, and a scrape read either.
        The last few, not all since: an outage that begins after many sends worked
        is told within a few sends, or seconds.
        """
        if not self.failing_sends or self._reconnects() != self._failed_at:
            return False
        # time.monotonic, not the loop's clock: metrics scrapes read this from
        # another thread.
        if time.monotonic() - self._failed_last >= FAILURE_MEMORY:
            return False
        if not self._recovered:
            return True
        if self._on_off_down:
            return True
        # A transport that stalls fails a send per SEND_TIMEOUT: counting them would
        # take minutes to tell an outage that began soon after a blip.
        return self._last_failed and time.monotonic() - self._worked_last >= _NONE_WORKED

    def _judge(self, failed: bool) -> None:
        """Count a send's outcome in a run that has had a send work."""
        self._recent.append(failed)
        self._last_failed = failed
        recent = list(self._recent)
        if self._on_off_down:
            # Up again once few fail: a timeout now and then is no outage.
            self._on_off_down = 8 * sum(recent) > len(recent)
        else:
            last = recent[-_RECENT_SENDS:]
            self._on_off_down = 2 * sum(last) >= len(last)

    def _reconnects(self) -> int:
        return int(getattr(self._wire.backend, "reconnects", 0))

    def _end_run(self) -> None:
        self.failing_sends = 0
        self._recovered = self._flapping = False
        self._recent.clear()
        self._on_off_down = self._last_failed = False

    def _worked(self) -> None:
        """A send worked during a run of failures: say so once; say so again when
        sends that failed on and off have worked for FAILURE_MEMORY, ending the run."""
        self._worked_last = time.monotonic()
        if not self._recovered:
            logger.info("live sends work again, after %d failed", self.failing_sends)
            self._recovered = True
            return
        self._judge(False)
        if self._flapping and time.monotonic() - self._failed_last >= FAILURE_MEMORY:
            logger.info("live sends work again, after %d failed on and off", self.failing_sends)
            self._end_run()

    def _failed(self, what: str, exc: Exception | None = None) -> None:
        """Count a failed live send; log the first of a run with its traceback, then
        one line every :data:`_FAILURES_LOGGED_EVERY` (an outage is not a log flood).

        A run ends when the transport reconnects, or when sends worked for
        :data:`FAILURE_MEMORY` after it: sends failing on and off stay one run, so
        they log neither a traceback nor a recovery per batch.
        """
        self._stats.live_send_failures += 1
        now = time.monotonic()
        if self.failing_sends and (
            self._reconnects() != self._failed_at
            or (self._recovered and now - self._failed_last >= FAILURE_MEMORY)
        ):
            self._end_run()  # this is another outage
        self.failing_sends += 1
        self._failed_last = now
        if self._recovered:
            self._flapping = True
            self._judge(True)
        if self.failing_sends == 1:
            self._failed_at = self._reconnects()
            logger.warning("%s (abandoned; subscribers read them from the log)", what, exc_info=exc)
        elif self.failing_sends % _FAILURES_LOGGED_EVERY == 0:
            reason = "" if exc is None else f": {exc!r}"
            how = "on and off" if self._flapping else "in a row"
            logger.warning(
                "live sends still failing (%d %s): %s%s", self.failing_sends, how, what, reason
            )


def _settle(future: asyncio.Future[Event], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def _filled(queue: deque[Any], ready: asyncio.Event, finished: Callable[[], bool]) -> bool:
    """Wait until ``queue`` holds something; ``False`` once it is empty and finished."""
    while not queue:
        if finished():
            return False
        ready.clear()
        await ready.wait()
    return True
