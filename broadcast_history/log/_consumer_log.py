"""The event log's methods for durable consumers (part of :class:`EventLog`).

Kept in a module of their own so each module stays small; ``EventLog`` inherits
them. They are the only way to table ``broadcast_consumers``: the leases that make
one process at a time the holder of a consumer, and the positions it commits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import InvalidArgument
from .._validation import check_channel, check_consumer, check_idle, check_int, check_lease
from . import _consumers
from ._calls import finish_on_cancel, finish_repeatable, translated
from ._consumers_mysql import deadlocked
from ._info import ConsumerInfo, ConsumerLags, LeaseAttempt, LeaseClaims
from ._store import Store

#: Tries of a consumer's position set that deadlocked with another (MySQL).
_SET_ATTEMPTS = 5
#: Idle consumers deleted per transaction (see delete_idle_consumers).
IDLE_BATCH = 500

_T = TypeVar("_T")


def _micros(lease: float) -> int:
    return round(check_lease(lease) * 1_000_000)


def _holder(holder: Any) -> str:
    if not isinstance(holder, str) or not 0 < len(holder) <= 64:
        raise InvalidArgument("a lease holder is a str of 1 to 64 characters")
    return holder


class ConsumerMethods:
    """Leases and positions of durable consumers."""

    _store: Store

    async def _lease_statement(self, run: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """``run`` on an autocommit connection, bounded as reads are: a log gone
        silent must not hold a holder's commit, nor the end of its subscription."""

        async def statement() -> _T:
            async with translated(), self._store.autocommit() as conn:
                return await run(conn)

        return await self._store.bounded(statement(), "a lease statement")

    @finish_on_cancel
    async def acquire_lease(
        self, channel: str, name: str, holder: str, lease: float
    ) -> LeaseAttempt:
        """Make ``holder`` the holder of consumer ``name`` of ``channel`` for ``lease``
        seconds, unless another holder's lease is still running.

        The check and the take are one statement: of several processes trying at
        once, exactly one gets the lease. When acquired, the answer carries the
        stored position (if any), read in that same statement.
        """
        check_channel(channel)
        check_consumer(name)
        lease_us = _micros(lease)
        holder = _holder(holder)
        return await self._lease_statement(
            lambda conn: _consumers.acquire(conn, channel, name, holder, lease_us)
        )

    @finish_on_cancel
    async def acquire_leases(
        self, claims: Sequence[tuple[str, str, str]], lease: float
    ) -> LeaseClaims:
        """:meth:`acquire_lease` for many consumers at once, for processes waiting
        for them: ``claims`` are (channel, name, holder), one per consumer.

        Returns:
            For each holder that got its lease, the stored (epoch, position), both
            ``None`` when no position is stored; and when the soonest lease of the
            others runs out unless renewed (see :class:`LeaseClaims`).
        """
        lease_us = _micros(lease)
        keys = {(channel, name) for channel, name, _ in claims}
        if len(keys) != len(claims):
            raise InvalidArgument("one claim per consumer")
        for channel, name, holder in claims:
            check_channel(channel)
            check_consumer(name)
            _holder(holder)
        return await self._lease_statement(
            lambda conn: _consumers.acquire_many(conn, claims, lease_us)
        )

    @finish_repeatable
    async def renew_leases(self, leases: Sequence[tuple[str, str, str]], lease: float) -> set[str]:
        """Extend ``leases`` ((channel, name, holder) each) by ``lease`` seconds, in one
        statement (per 500 leases); returns the holders whose lease was extended.

        A holder missing from the answer lost its lease: another process took the
        consumer over after it ran out, an operator set or deleted its position then,
        or it was given back. A lease that ran out but that nobody took and nobody
        set is renewed: no other holder processed anything meanwhile.
        """
        lease_us = _micros(lease)
        if not leases:
            return set()
        # Channel and name are only looked up: a lease naming no stored row is not
        # renewed, as one no longer held.
        for item in leases:
            if not (isinstance(item, tuple) and len(item) == 3):
                raise InvalidArgument(
                    f"renew_leases takes (channel, name, holder) tuples, got {item!r}"
                )
            _holder(item[2])
        return await self._lease_statement(lambda conn: _consumers.renew(conn, leases, lease_us))

    @finish_repeatable
    async def release_lease(self, channel: str, name: str, holder: str) -> None:
        """Give up ``holder``'s lease of the consumer (nothing if it is not held by
        ``holder``); a consumer that never committed is forgotten with it."""
        await self._lease_statement(lambda conn: _consumers.release(conn, channel, name, holder))

    @finish_repeatable
    async def commit_position(
        self, channel: str, name: str, holder: str, epoch: int, position: int, lease: float
    ) -> int | None:
        """Store the consumer's position, fenced by ``holder``'s lease.

        Written only if ``holder`` still holds an unexpired lease, checked in the
        same statement (which also extends the lease by ``lease`` seconds). A
        position is never moved backwards within an epoch.

        Returns:
            The position now stored (``position`` or a higher one committed before),
            or ``None`` if ``holder`` does not hold the lease: nothing was written.
        """
        check_int("epoch", epoch)
        check_int("position", position)
        lease_us = _micros(lease)
        return await self._lease_statement(
            lambda conn: _consumers.commit(conn, channel, name, holder, epoch, position, lease_us)
        )

    @finish_repeatable
    async def consumers(
        self,
        channel: str | None = None,
        *,
        after: tuple[str, str] | None = None,
        limit: int | None = None,
    ) -> list[ConsumerInfo]:
        """The durable consumers (of ``channel``, or of every channel), ordered by
        channel and name, with their lag and live holder: those after ``after`` (a
        channel and a consumer name), at most ``limit`` of them."""
        if channel is not None:
            check_channel(channel)
        if after is not None:
            if not isinstance(after, tuple | list) or len(after) != 2:
                raise InvalidArgument("after must be a (channel, consumer) pair")
            check_channel(after[0])
            check_consumer(after[1])
            after = (after[0], after[1])
        if limit is not None:
            check_int("limit", limit, minimum=1)
        async with translated(), self._store.begin() as conn:
            return await _consumers.listing(conn, channel, after, limit)

    @finish_repeatable
    async def consumer_lags(self, limit: int) -> ConsumerLags:
        """The ``limit`` largest lags of committed consumers (ties by channel and
        name), and how many committed consumers there are: what metrics export,
        however many consumers the log keeps. A position of an earlier epoch lags
        by every event of the channel now; consumers of channels that no longer
        exist are left out."""
        check_int("limit", limit)
        async with translated(), self._store.begin() as conn:
            return await _consumers.lags(conn, limit)

    @finish_on_cancel
    async def set_consumer(self, channel: str, name: str, position: int) -> ConsumerInfo | None:
        """Store ``position`` (in the channel's current epoch) as the consumer's, created
        if needed; it may move backwards (to process events again). ``None`` if the
        channel does not exist.

        Raises:
            ConsumerBusy: A running process holds the consumer.
            OffsetOutOfRange: ``position`` is beyond the channel's head.
            HistoryTruncated: Events after ``position`` were trimmed.
        """
        check_channel(channel)
        check_consumer(name)
        check_int("position", position)
        async with translated():
            for attempt in range(_SET_ATTEMPTS):
                try:
                    async with self._store.begin(write=True) as conn:
                        return await _consumers.set_position(conn, channel, name, position)
                except DBAPIError as exc:
                    # MySQL: sets creating the same consumer at once deadlock (gap
                    # locks); the loser's transaction was rolled back whole.
                    if not deadlocked(exc) or attempt == _SET_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    @finish_on_cancel
    async def delete_idle_consumers(
        self, idle_for: timedelta, *, channel: str | None = None
    ) -> int:
        """Forget the consumers (of ``channel``, or of every channel) that nobody
        holds and whose last use is older than ``idle_for``; how many.

        A consumer's last use is the later of its last commit and the end of its last
        lease (given back or run out). They are deleted IDLE_BATCH at a time, each
        batch in a transaction of its own.
        """
        if channel is not None:
            check_channel(channel)
        idle_us = check_idle(idle_for)
        deleted = 0
        after: tuple[str, str] | None = None
        while True:
            async with translated(), self._store.begin() as conn:
                keys = await _consumers.idle_keys(conn, channel, idle_us, after, IDLE_BATCH)
            if not keys:
                return deleted
            # Checked again as they go: one taken meanwhile stays.
            async with translated(), self._store.begin(write=True) as conn:
                deleted += await _consumers.forget_idle(conn, channel, idle_us, after, keys[-1])
            if len(keys) < IDLE_BATCH:
                return deleted
            after = keys[-1]

    @finish_on_cancel
    async def delete_consumer(self, channel: str, name: str) -> bool:
        """Forget a consumer and its position; whether it existed.

        Raises:
            ConsumerBusy: A running process holds the consumer.
        """
        check_channel(channel)
        check_consumer(name)
        async with translated(), self._store.begin(write=True) as conn:
            return await _consumers.remove(conn, channel, name)
