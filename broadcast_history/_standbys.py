"""Subscriptions waiting for a durable consumer that another holder has (standbys).

The standbys of one broadcast ask together: once per third of a lease, one read of
which wanted consumers are held (it locks nothing), then one statement trying the
free ones (``EventLog.acquire_leases``). A thousand standbys cost what one does. A
subscription of the same broadcast that lets a consumer go pokes them to ask at
once; one in another process is noticed at the next period, and a dead holder's
lease when it runs out: a standby takes over within a lease and a third of one. A
holder's lease that runs out before the next period (the holder's lease is shorter
than the standby's) is asked for when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import _clock
from ._cancel import wait_for
from ._errors import LogError, Unsubscribed
from .log import EventLog

logger = logging.getLogger("broadcast_history")
# After a holder's lease runs out by the database's clock, before asking for it.
_AFTER = 0.02
#: Soonest a standby asks again because a holder's lease runs out, in seconds.
EARLIEST = 0.5
#: What a standby gets with the lease: when the winning statement was sent (on the
#: lease clock) and the stored (epoch, position), both ``None`` if none is stored.
Taken = tuple[float, tuple[int | None, int | None]]


class _Waiting:
    __slots__ = ("channel", "holder", "name", "taken")

    def __init__(self, channel: str, name: str, holder: str, taken: asyncio.Future[Taken]):
        self.channel = channel
        self.name = name
        self.holder = holder
        self.taken = taken


class Standbys:
    """Every subscription of one broadcast waiting for a consumer's lease."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        # By lease duration (each has its own period and poller), by holder id.
        self._waiting: dict[float, dict[str, _Waiting]] = {}
        self._pollers: dict[float, asyncio.Task[None]] = {}
        self._pokes: dict[float, asyncio.Event] = {}
        # Per period: the timer that asks early, as a holder's lease runs out.
        self._timers: dict[float, asyncio.TimerHandle] = {}

    async def wait(
        self, channel: str, name: str, holder: str, lease: float, expires_in: float | None = None
    ) -> Taken:
        """Wait until ``holder`` has the lease of consumer ``name`` of ``channel``
        (whose holder's lease runs out in ``expires_in`` seconds unless renewed).

        Raises:
            Unsubscribed: The broadcast disconnected meanwhile.
        """
        taken: asyncio.Future[Taken] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease, {})[holder] = _Waiting(channel, name, holder, taken)
        poller = self._pollers.get(lease)
        if poller is None or poller.done():
            self._pokes[lease] = asyncio.Event()
            self._pollers[lease] = asyncio.create_task(
                self._poll(lease), name="broadcast-history-standbys"
            )
        if expires_in is not None:
            self._ask_when(lease, expires_in)
        try:
            return await taken
        except asyncio.CancelledError:
            self._waiting.get(lease, {}).pop(holder, None)
            if taken.done() and not taken.cancelled() and taken.exception() is None:
                # Taken as the caller gave up: give it back, so others need not wait.
                await asyncio.shield(self.log.release_lease(channel, name, holder))
            raise

    def _ask_when(self, lease: float, expires_in: float) -> None:
        """Ask again as a held lease runs out, if before the next period (one timer
        per period, the earliest; not sooner than EARLIEST after now: a live holder
        with a very short lease must not set the pace of the standbys' reads)."""
        poke = self._pokes.get(lease)
        if poke is None:
            return
        loop = asyncio.get_running_loop()
        # A moment after, so that the lease has surely run out for the database.
        when = loop.time() + max(expires_in + _AFTER, EARLIEST)
        timer = self._timers.get(lease)
        if when >= loop.time() + lease / 3 or (timer is not None and timer.when() <= when):
            return
        if timer is not None:
            timer.cancel()
        self._timers[lease] = loop.call_at(when, poke.set)

    def poke(self) -> None:
        """A consumer was let go here: ask now rather than at the next period."""
        for poke in self._pokes.values():
            poke.set()

    def forget(self) -> None:
        """Drop the standbys of an event loop that ended (their tasks ended with it)."""
        for table in (self._waiting, self._pollers, self._pokes, self._timers):
            table.clear()

    async def close(self) -> None:
        """Stop waiting: every standby gets :class:`Unsubscribed`."""
        pollers = list(self._pollers.values())
        self._pollers.clear()
        self._pokes.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        for group in self._waiting.values():
            for waiting in group.values():
                if not waiting.taken.done():
                    waiting.taken.set_exception(Unsubscribed("the broadcast disconnected"))
        self._waiting.clear()

    def _stop(self, lease: float) -> dict[str, _Waiting]:
        """Forget the poller of ``lease``; returns the standbys it had (the next
        standby of this duration starts a poller)."""
        self._pollers.pop(lease, None)
        self._pokes.pop(lease, None)
        timer = self._timers.pop(lease, None)
        if timer is not None:
            timer.cancel()
        return self._waiting.pop(lease, {})

    def _fail(self, lease: float, exc: Exception) -> None:
        """End the poller of ``lease``: each of its standbys raises a :class:`LogError`
        caused by ``exc``."""
        for waiting in self._stop(lease).values():
            if not waiting.taken.done():
                error = LogError(f"asking for the standbys' leases failed: {exc!r}")
                error.__cause__ = exc
                waiting.taken.set_exception(error)

    async def _poll(self, lease: float) -> None:
        poke = self._pokes[lease]
        while True:
            group = self._waiting.get(lease)
            if not group:
                self._stop(lease)  # nobody waits
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(poke.wait(), lease / 3)
            poke.clear()
            timer = self._timers.pop(lease, None)  # fired, or made moot by this read
            if timer is not None:
                timer.cancel()
            # One claim per consumer: a statement may not take the same row twice.
            claims: dict[tuple[str, str], _Waiting] = {}
            for waiting in group.values():
                if not waiting.taken.done():
                    claims.setdefault((waiting.channel, waiting.name), waiting)
            if not claims:
                continue
            sent = _clock.lease_clock()
            try:
                taken, next_expiry = await self.log.acquire_leases(
                    [(w.channel, w.name, w.holder) for w in claims.values()], lease
                )
            except LogError as exc:
                # A standby's job is to wait: try again next period.
                logger.warning("standbys could not ask for their leases: %s", exc)
                continue
            except Exception as exc:
                # Not the log's trouble (a bug, or the log closed under it): without a
                # poller its standbys waited for ever. They get the error instead.
                logger.error("standbys stopped asking for their leases: %r", exc)
                self._fail(lease, exc)
                return
            if next_expiry is not None:
                self._ask_when(lease, next_expiry)
            for waiting in claims.values():
                stored = taken.get(waiting.holder)
                if stored is not None:
                    group.pop(waiting.holder, None)
                    if not waiting.taken.done():
                        waiting.taken.set_result((sent, stored))
                        continue
                    try:  # the standby gave up meanwhile: let the lease go
                        await self.log.release_lease(waiting.channel, waiting.name, waiting.holder)
                    except LogError as exc:
                        logger.warning("an unwanted lease runs out by itself: %s", exc)
