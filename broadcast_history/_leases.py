"""The leases of durable consumers a broadcast holds: taken, renewed, given back.

Renewal cost does not grow with the number of consumers a process holds: the leases
of one duration are renewed together, by one statement a third of the lease apart
(``EventLog.renew_leases``), so 1,000 consumers held by one broadcast cost about as
much as one. Subscriptions waiting for a consumer held elsewhere ask together too
(:mod:`._standbys`).

Renewals must not wait behind other writes: SQLite runs one write at a time, so a
burst of 1,000 acquisitions or commits could delay a renewal past the lease. A
broadcast therefore has at most a few acquisitions, commits and releases in flight
(:data:`IN_FLIGHT`); renewals do not queue behind the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from . import _clock
from ._consumer import DEFAULT_LEASE, Bound, Holding
from ._errors import BroadcastError, ConsumerBusy, InvalidArgument, LogUnavailable
from ._gate import Gate
from ._standbys import Standbys
from ._validation import check_consumer, check_lease, check_seconds
from .log import EventLog, LeaseAttempt

logger = logging.getLogger("broadcast_history")
S = TypeVar("S", bound=Bound)
T = TypeVar("T")
#: Lease writes (acquire, commit, release) one broadcast runs at once.
IN_FLIGHT = 8
#: Shortest auto_commit period, in seconds.
AUTO_COMMIT_MIN = 0.01
#: Least time a subscription's end waits for its lease to be given back.
RELEASE_WAIT = 1.0


def check_consumer_options(
    consumer: str | None, auto_commit: float | None, wait: bool, lease: float
) -> None:
    """Check the durable-consumer arguments of ``subscribe``."""
    if consumer is None:
        if auto_commit is not None or wait is not True or lease != DEFAULT_LEASE:
            raise InvalidArgument("auto_commit, wait and lease need consumer=")
        return
    check_consumer(consumer)
    check_lease(lease)
    if auto_commit is not None and check_seconds("auto_commit", auto_commit) < AUTO_COMMIT_MIN:
        # A shorter period would keep its task spinning for nothing.
        raise InvalidArgument(
            f"auto_commit must be at least {AUTO_COMMIT_MIN} s, got {auto_commit}"
        )
    if not isinstance(wait, bool):
        raise InvalidArgument(f"wait must be a bool, got {type(wait).__name__}")


class Leases:
    """Every durable consumer one broadcast holds."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self._host = socket.gethostname()[:32]
        # Held leases by duration, by holder id: each duration has its renewal task.
        self._held: dict[float, dict[str, Holding]] = {}
        self._renewers: dict[float, asyncio.Task[None]] = {}
        self._standbys = Standbys(log)
        self._background: set[asyncio.Task[Any]] = set()
        # Made in the running loop on first use (see IN_FLIGHT).
        self._gate: Gate | None = None

    @property
    def gate(self) -> Gate:
        """What acquisitions, commits and releases queue on (renewals do not)."""
        if self._gate is None:
            self._gate = Gate(IN_FLIGHT)
        return self._gate

    @asynccontextmanager
    async def subscription(
        self,
        subscribe: Callable[..., AbstractAsyncContextManager[S]],
        channel: str,
        name: str,
        start: tuple[int | datetime | None, int | None, int | None],
        hold: tuple[float | None, bool, float],
    ) -> AsyncIterator[S]:
        """Hold consumer ``name`` of ``channel`` for a subscription made by ``subscribe``.

        Args:
            start: ``since``, ``history`` and ``epoch`` for when no position is stored.
                A stored position wins: the subscription starts after it, in its epoch
                (so a reset channel raises ``StreamReset``, trimmed events
                ``HistoryTruncated``).
            hold: ``auto_commit``, ``wait`` and ``lease`` (see ``Broadcast.subscribe``).
        """
        (since, history, epoch), (auto_commit, wait, lease) = start, hold
        holding = await self._acquire(channel, name, lease, wait, auto_commit)
        try:
            if holding.stored is not None:
                (epoch, since), history = holding.stored, None
            async with subscribe(channel, since=since, history=history, epoch=epoch) as sub:
                holding.bind(sub)
                yield sub
                await holding.finish()
        finally:
            await self._release(holding)

    async def close(self) -> None:
        """Stop standbys; store what auto-committing holders handled, then give every
        lease back."""
        # Before anything is awaited: a subscription that ends meanwhile (disconnect
        # just closed them all) would store its position as this gives the lease back.
        for group in self._held.values():
            for holding in group.values():
                holding.closing = True
        await self._standbys.close()
        renewers = list(self._renewers.values())
        self._renewers.clear()
        for task in renewers:
            task.cancel()
        await asyncio.gather(*renewers, return_exceptions=True)
        holdings = [holding for group in self._held.values() for holding in group.values()]
        # At once: each waits for a log that may not answer (at most a lease).
        await asyncio.gather(*(self._close_one(holding) for holding in holdings))
        # Leases being given back by subscriptions that ended just before: done
        # before the log goes away under them.
        await asyncio.gather(*list(self._background), return_exceptions=True)
        self._held.clear()
        self._gate = None

    def forget(self) -> None:
        """Drop the leases of an event loop that ended, neither renewed nor given
        back: they run out in the log, as a dead process's do."""
        self._standbys.forget()
        self._held.clear()
        self._renewers.clear()
        self._background.clear()
        self._gate = None

    async def _close_one(self, holding: Holding) -> None:
        await holding.commit_handled()
        await self._release(holding, final=True)

    # -- taking and giving back ----------------------------------------------------

    async def _acquire(
        self, channel: str, name: str, lease: float, wait: bool, auto_commit: float | None
    ) -> Holding:
        holder = f"{self._host}:{os.getpid()}:{secrets.token_hex(6)}"
        sent, attempt = await self._try(channel, name, holder, lease)
        found = attempt.epoch, attempt.position
        if not attempt.acquired:
            if not wait:
                raise ConsumerBusy(
                    f"consumer {name!r} of {channel!r} is held by {attempt.holder} (its lease "
                    f"runs out in {attempt.expires_in:.1f} s unless renewed)"
                )
            sent, found = await self._standbys.wait(
                channel, name, holder, lease, attempt.expires_in
            )
        stored = None if found[0] is None or found[1] is None else (found[0], found[1])
        holding = Holding(
            self.log,
            self.gate,
            channel,
            name,
            holder,
            lease=lease,
            auto_commit=auto_commit,
            stored=stored,
            valid_until=sent + lease,
        )
        group = self._held.setdefault(lease, {})
        group[holder] = holding
        task = self._renewers.get(lease)
        if task is None or task.done():
            self._renewers[lease] = asyncio.create_task(
                self._renew(lease), name="broadcast-history-lease-renewal"
            )
        return holding

    async def _try(
        self, channel: str, name: str, holder: str, lease: float
    ) -> tuple[float, LeaseAttempt]:
        """(when the statement was sent, on the lease clock, and its outcome)."""
        # The lease runs from the statement (``sent``), not from the wait for the
        # gate: a burst of subscribes queues here longer than a short lease.
        sent, task = await self.gate.start(
            lambda: self.log.acquire_lease(channel, name, holder, lease)
        )
        try:
            return sent, await asyncio.shield(task)
        except asyncio.CancelledError:
            # The statement still runs to its end (in its slot) and may take the
            # lease: give it back then, rather than leave a standby waiting for it
            # to run out.
            task.add_done_callback(lambda done: self._give_back(done, channel, name, holder))
            raise
        except LogUnavailable:
            # No answer in time: the statement may have taken the lease all the same,
            # for a holder id nobody renews, and everyone waited a lease for it.
            self._in_background(self._give_back_if_taken(channel, name, holder))
            raise

    async def _give_back_if_taken(self, channel: str, name: str, holder: str) -> None:
        """Release the lease of ``holder`` if it has it (nothing otherwise)."""
        try:
            await self.log.release_lease(channel, name, holder)
        except BroadcastError as exc:
            logger.debug("a lease taken without an answer runs out by itself: %s", exc)

    def _give_back(
        self, done: asyncio.Future[LeaseAttempt], channel: str, name: str, holder: str
    ) -> None:
        if done.cancelled() or done.exception() is not None or not done.result().acquired:
            return
        self._in_background(self._give_back_if_taken(channel, name, holder))

    async def _release(self, holding: Holding, *, final: bool = False) -> None:
        if holding.closing and not final:
            # The disconnect under way commits what it handled, then gives it back.
            await holding.stop_auto()
            return
        # Not renewed from here on, before anything is awaited: a second cancellation
        # of the caller (anyio's cancel scopes deliver one at each await) left it
        # renewed for as long as the process ran, and its standbys waiting as long.
        group = self._held.get(holding.lease)
        if group is not None:
            group.pop(holding.holder, None)
        if holding.closed:
            await holding.stop_auto()
            return
        holding.closed = True
        # Given back by a task of its own, which a caller cancelled again does not
        # cut short (that caller stops waiting for it, nothing more).
        await asyncio.shield(self._in_background(self._give_lease_back(holding)))

    def _in_background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """``work`` as a task kept until it ends (``close()`` waits for them)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _give_lease_back(self, holding: Holding) -> None:
        await holding.stop_auto()
        try:
            # Past a lease the lease has run out anyway: the subscription's end does
            # not wait longer for a log that does not answer.
            limit = max(holding.lease, RELEASE_WAIT)
            await self.gate.run(
                lambda: self.log.release_lease(holding.channel, holding.name, holding.holder),
                quiet=limit,
                answer=limit,
            )
        except (BroadcastError, asyncio.TimeoutError) as exc:
            logger.warning(
                "consumer %r of %r: giving its lease back failed (it runs out by itself): %s",
                holding.name,
                holding.channel,
                str(exc) or "no answer",
            )
        self._standbys.poke()

    # -- renewal -------------------------------------------------------------------

    async def _renew(self, lease: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        while True:
            # A third of the lease from one renewal's start to the next, not after
            # it ended: a renewal of many leases can take a good part of that third.
            await asyncio.sleep(max(0.0, sent + lease / 3 - loop.time()))
            sent = loop.time()  # here, so a period that renews nothing paces the next
            group = self._held.get(lease)
            if not group:
                # Nothing left to renew: stop (a new lease of this duration starts a task).
                self._held.pop(lease, None)
                self._renewers.pop(lease, None)
                return
            # A lost lease is not renewed: its holder stopped serving, and a renewal
            # would keep a standby waiting until the subscription is closed.
            holdings = [holding for holding in group.values() if not holding.lost]
            if not holdings:
                continue
            stamp = _clock.lease_clock()  # what the renewed leases count from
            try:
                kept: set[str] | None = await self.log.renew_leases(
                    [(holding.channel, holding.name, holding.holder) for holding in holdings],
                    lease,
                )
            except Exception as exc:
                # Tried again next period; meanwhile each holding stops by itself once
                # its lease may have run out (Holding.check).
                logger.warning("renewing %d consumer leases failed: %s", len(holdings), exc)
                kept = None
            for holding in holdings:
                if kept is None:
                    if holding.overdue():
                        holding.lose("the log could not be reached to renew it")
                elif holding.holder in kept:
                    holding.renewed(stamp)
                elif group.get(holding.holder) is holding:
                    group.pop(holding.holder, None)
                    holding.lose(
                        "it ran out, and meanwhile another holder took it over or its "
                        "position was set"
                    )
