"""Durable consumers: a position kept in the log, and one holder at a time.

``subscribe(channel, consumer=name)`` first takes the consumer's *lease* in the log,
waiting while another process holds it (or raising :class:`ConsumerBusy` with
``wait=False``), then starts after the position stored there. While a subscription
holds the lease, its broadcast renews it: every lease of one duration in a single
statement, a third of the lease apart (see :mod:`._leases`). Commits are fenced by
the lease: the log stores a position only if the lease is still this holder's,
checked in the same statement, so two holders never both advance a position.

A holder that cannot show a renewal younger than its lease (a paused process, an
unreachable database) stops by itself: its next ``get`` or ``commit`` raises
:class:`ConsumerBusy`, whether or not another process took over meanwhile. The time
it counts from is when the last successful renewal was *sent*, so a renewal answered
after a long pause does not make an expired lease look valid.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from . import _clock
from ._cancel import wait_for
from ._errors import BroadcastError, ConsumerBusy, InvalidArgument, LogUnavailable, Unsubscribed
from ._event import Event
from ._gate import Gate

if TYPE_CHECKING:
    from .log import EventLog

logger = logging.getLogger("broadcast_history")

#: Seconds a holder's lease lasts unless renewed (it is renewed every third of it).
DEFAULT_LEASE = 10.0


class Bound(Protocol):
    """What a holding needs of the subscription it serves (a ``Subscriber``)."""

    _consumer: Holding | None

    @property
    def epoch(self) -> int | None: ...

    @property
    def position(self) -> int: ...

    def _fail(self, error: BaseException) -> None: ...


class Committable:
    """The commit of a durable consumer's subscription (``Subscriber`` inherits it)."""

    _consumer: Holding | None

    async def commit(self, event: Event | None = None) -> None:
        """Store this durable consumer's position: the last event delivered, or ``event``.

        The next holder of the consumer (this program restarted, or a standby taking
        over) starts after it. A position never moves backwards: committing an older
        event than one committed before changes nothing.

        Args:
            event: An event this subscription delivered (default: the last one).

        Raises:
            ConsumerBusy: This subscription lost the consumer's lease (another process
                may hold it now); nothing was stored, unless the log did not answer
                before the lease could run out (the commit may land later, fenced by
                the lease).
            InvalidArgument: The subscription is not a durable consumer (no
                ``consumer=``), or ``event`` was not delivered by it.
            LogUnavailable: The log could not be reached, and nothing was stored; or
                it did not answer within the lease while the lease stayed renewed (the
                commit may land later; committing again is safe).
        """
        holding = self._consumer
        if holding is None:
            raise InvalidArgument(
                "commit() is for durable consumers: subscribe(channel, consumer=...)"
            )
        await holding.commit_delivered(event)


class Holding:
    """One lease of a consumer held for one subscription: its commits and its state.

    Made by :class:`~._leases.Leases`, which renews and releases it.
    """

    def __init__(
        self,
        log: EventLog,
        gate: Gate,
        channel: str,
        name: str,
        holder: str,
        *,
        lease: float,
        auto_commit: float | None,
        stored: tuple[int, int] | None,
        valid_until: float,
    ) -> None:
        self.channel = channel
        self.name = name
        #: This lease's unique id in the log (``host:pid:random``).
        self.holder = holder
        self.lease = lease
        self.auto_commit = auto_commit
        #: The position found when the lease was taken, as ``(epoch, position)``.
        self.stored = stored
        #: Set once released (or the broadcast disconnected): nothing more is stored.
        self.closed = False
        #: Set when the broadcast starts disconnecting: it stores what was handled and
        #: gives the lease back, so the subscription's own end stores nothing.
        self.closing = False
        self._log = log
        self._gate = gate
        self._committed = stored
        # Events handed out before the subscriber was asked for the next one count as
        # handled: what auto_commit stores (never an event still being processed).
        self._handled: tuple[int, int] | None = None
        # Until when the lease is surely ours, on the lease clock: the send time of
        # the last successful acquire, renewal or commit, plus the lease.
        self._valid_until = valid_until
        self._lost: str | None = None
        self._subscriber: Bound | None = None
        self._start: tuple[int | None, int] = (None, 0)
        self._auto: asyncio.Task[None] | None = None

    @property
    def lost(self) -> bool:
        """Whether the lease is known to be lost."""
        return self._lost is not None

    def bind(self, subscriber: Bound) -> None:
        """Serve ``subscriber`` (positioned already): its commits go through this lease."""
        self._subscriber = subscriber
        # What it delivers comes after this: an earlier event was not delivered by it.
        self._start = (subscriber.epoch, subscriber.position)
        subscriber._consumer = self
        if self.auto_commit is not None:
            self._auto = asyncio.create_task(
                self._commit_every(self.auto_commit), name="broadcast-history-auto-commit"
            )

    # -- the lease -----------------------------------------------------------------

    def overdue(self) -> bool:
        """Whether the lease may have run out: no renewal younger than the lease."""
        return _clock.lease_clock() > self._valid_until

    def check(self) -> None:
        """Raise :class:`ConsumerBusy` if the lease is lost, or not surely still ours."""
        if self._lost is None and self.overdue():
            self.lose("it was not renewed in time (the process was paused, or the log unreachable)")
        if self._lost is not None:
            raise ConsumerBusy(self._lost)

    def renewed(self, sent: float) -> None:
        """A renewal (or commit) sent at ``sent`` (on the lease clock) succeeded."""
        self._valid_until = max(self._valid_until, sent + self.lease)

    def lose(self, reason: str) -> None:
        """The lease is gone: fail the subscriber (its next ``get`` raises)."""
        if self._lost is not None:
            return
        self._lost = (
            f"consumer {self.name!r} of {self.channel!r} lost its lease: {reason}; the next "
            "holder processes the events after the last commit again"
        )
        if self._subscriber is not None:
            self._subscriber._fail(ConsumerBusy(self._lost))

    # -- commits -------------------------------------------------------------------

    def next_asked(self, epoch: int | None, position: int) -> None:
        """The subscriber is asked for its next event: what it delivered is handled."""
        self.check()
        if epoch is not None:
            self._handled = (epoch, position)

    async def commit_delivered(self, event: Event | None) -> None:
        """Commit the subscriber's position, or ``event`` (which it must have delivered)."""
        subscriber = self._subscriber
        if subscriber is None:  # bound before the subscription is handed out: unreachable
            raise InvalidArgument("this subscription is not positioned yet")
        epoch, position = subscriber.epoch, subscriber.position
        if event is not None:
            if not isinstance(event, Event):
                raise InvalidArgument(
                    f"commit() takes an Event this subscription delivered, got "
                    f"{type(event).__name__}"
                )
            after = self._start[1] if self._start[0] == event.epoch else 0
            if (
                event.channel != self.channel
                or event.epoch != epoch
                or not after < event.offset <= position
            ):
                raise InvalidArgument(
                    f"event {event.offset} of {event.channel!r} (epoch {event.epoch}) was not "
                    "delivered by this subscription"
                )
            position = event.offset
        await self.commit(epoch, position)

    async def commit(self, epoch: int | None, position: int) -> None:
        """Store ``position`` of ``epoch``, fenced by the lease."""
        if self.closed:
            raise self._ended()
        self.check()
        if epoch is None:
            return  # nothing delivered, and the channel does not exist yet: nothing to keep
        done = self._committed
        if done is not None and done[0] == epoch and done[1] >= position:
            return
        try:
            sent, task = await self._gate.start(
                lambda: self._log.commit_position(
                    self.channel, self.name, self.holder, epoch, position, self.lease
                ),
                quiet=self.lease,
            )
        except asyncio.TimeoutError:
            # The lease writes ahead of it in the gate got no answer: not sent.
            raise self._unanswered(
                "the lease writes queued before a commit", "nothing was stored"
            ) from None
        try:
            # An answer proves the lease for a lease from the statement (fenced by
            # it, and extending it): no longer is waited for.
            stored = await wait_for(asyncio.shield(task), self.lease)
        except asyncio.TimeoutError:
            # The statement goes on: it may still store the position, fenced by the
            # lease.
            raise self._unanswered("a commit", "it may still be stored") from None
        if stored is None:
            if self.closed and not self.overdue():
                # The block ended meanwhile and its release came first: not a loss.
                raise self._ended()
            self.lose("another holder took it over, or it ran out")
            raise ConsumerBusy(str(self._lost))
        self.renewed(sent)
        done = self._committed  # another commit may have finished meanwhile
        if done is None or done[0] != epoch or stored > done[1]:
            self._committed = (epoch, stored)

    def _unanswered(self, what: str, outcome: str) -> BroadcastError:
        """What a commit raises when the log did not answer ``what`` in time."""
        # A slow answer alone proves nothing lost: renewals, which do not queue behind
        # commits, may have kept the lease meanwhile.
        if not self.overdue():
            return LogUnavailable(
                f"consumer {self.name!r} of {self.channel!r}: the log did not answer {what} "
                f"within {self.lease:g} s ({outcome}); the lease is still held"
            )
        # A standby may have taken over meanwhile.
        self.lose("the log did not answer a commit before the lease could run out")
        return ConsumerBusy(str(self._lost))

    def _ended(self) -> Unsubscribed:
        return Unsubscribed(
            f"consumer {self.name!r} of {self.channel!r}: the subscription has ended and "
            "gave its lease back; nothing more is stored"
        )

    async def finish(self) -> None:
        """The subscription ends normally: with ``auto_commit``, store what it delivered."""
        await self.stop_auto()
        subscriber = self._subscriber
        if self.auto_commit is None or self.closed or subscriber is None:
            return
        if self.closing:
            # The disconnect under way commits it (its own commit would race its
            # release): a normal end hands it everything delivered.
            if subscriber.epoch is not None:
                self._handled = (subscriber.epoch, subscriber.position)
            return
        if self._lost is not None:
            logger.warning("%s: the last events were not committed", self._lost)
            return
        await self.commit(subscriber.epoch, subscriber.position)

    async def commit_handled(self) -> None:
        """With ``auto_commit``, store what is handled; errors are logged (for disconnect)."""
        await self.stop_auto()
        handled = self._handled
        if self.auto_commit is None or handled is None or self._lost is not None:
            return
        try:
            await self.commit(*handled)
        except BroadcastError as exc:
            logger.warning(
                "consumer %r of %r: last commit failed: %s", self.name, self.channel, exc
            )

    async def stop_auto(self) -> None:
        task, self._auto = self._auto, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _commit_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            handled = self._handled
            if handled is None:
                continue
            try:
                await self.commit(*handled)
            except ConsumerBusy:
                return  # the subscriber has been failed with it
            except BroadcastError as exc:
                # The next period tries again; at worst, more work is repeated later.
                logger.warning(
                    "consumer %r of %r: auto commit failed: %s", self.name, self.channel, exc
                )
