"""The admin queries of durable consumers (part of :class:`HistoryAdmin`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

from .._validation import check_channel, check_consumer, check_int
from ..log import ConsumerInfo, EventLog
from ._errors import ChannelNotFound, ConsumerNotFound
from ._limits import check_limit

#: Consumers read per query by :meth:`ConsumerAdmin.all_consumers`.
CONSUMER_PAGE = 1000


class ConsumerAdmin:
    """Durable consumers: list them with their lag, move or forget a position."""

    log: EventLog

    async def consumers(
        self,
        channel: str | None = None,
        *,
        after: tuple[str, str] | None = None,
        limit: int | None = None,
    ) -> list[ConsumerInfo]:
        """Durable consumers (of ``channel``, or of every channel), ordered by channel
        and name, with their position, lag behind the head and live holder.

        A consumer may name a channel that does not exist (yet, or any more).

        Args:
            channel: Only this channel's consumers.
            after: Cursor: only consumers after this (channel, name), as the last
                one of the previous page.
            limit: At most this many (1 to 10 000; default: every consumer).
        """
        if channel is not None:
            check_channel(channel)
        if limit is not None:
            check_limit(limit)
        return await self.log.consumers(channel, after=after, limit=limit)

    async def all_consumers(self, channel: str | None = None) -> AsyncIterator[ConsumerInfo]:
        """Every durable consumer (of ``channel``), read CONSUMER_PAGE at a time."""
        after: tuple[str, str] | None = None
        while True:
            page = await self.consumers(channel, after=after, limit=CONSUMER_PAGE)
            for info in page:
                yield info
            if len(page) < CONSUMER_PAGE:
                return
            after = (page[-1].channel, page[-1].name)

    async def set_consumer(self, channel: str, name: str, position: int) -> ConsumerInfo:
        """Set the stored position of consumer ``name`` of ``channel`` (created if
        needed), in the channel's current epoch: its next holder starts after it.

        Moving it back makes the consumer process events again; forward, skip them.

        Raises:
            ChannelNotFound: The log has no such channel.
            ConsumerBusy: A running process holds the consumer: stop it first.
            OffsetOutOfRange: ``position`` is beyond the channel's head.
            HistoryTruncated: Events after ``position`` were trimmed.
        """
        check_channel(channel)
        check_consumer(name)
        check_int("position", position)
        info = await self.log.set_consumer(channel, name, position)
        if info is None:
            raise ChannelNotFound(f"no channel {channel!r} in the log")
        return info

    async def delete_idle_consumers(
        self, idle_for: timedelta, *, channel: str | None = None
    ) -> int:
        """Forget the consumers (of ``channel``, or all) that nobody holds and that
        nobody held nor committed to for ``idle_for``; returns how many.

        A consumer's row stays until it is deleted, whether or not a worker still
        runs it: an app that names consumers per session or per deploy leaves one
        behind each time. Deleting one forgets its position: if its worker comes
        back, it starts from its ``since``/``history`` again. So nothing is deleted
        on its own: pick ``idle_for`` longer than any worker may stay away.
        """
        return await self.log.delete_idle_consumers(idle_for, channel=channel)

    async def delete_consumer(self, channel: str, name: str) -> None:
        """Forget consumer ``name`` of ``channel`` and its position: its next
        subscription starts from its ``since``/``history`` again.

        Raises:
            ConsumerNotFound: No such consumer.
            ConsumerBusy: A running process holds the consumer: stop it first.
        """
        check_channel(channel)
        check_consumer(name)
        if not await self.log.delete_consumer(channel, name):
            raise ConsumerNotFound(f"no consumer {name!r} of channel {channel!r}")
