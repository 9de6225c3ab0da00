"""The admin query layer: what the HTTP app and the CLI both call.

Built on :class:`~broadcast_history.EventLog`: its own methods (``read``, ``get``,
``trim``, ``delete_channel``) do the work where they fit; the queries here add what
an operator needs on top (stats with the oldest stored timestamp, pages with a cursor,
totals), through the same engine and tables.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeVar

from .._errors import InvalidArgument
from .._event import Event
from .._validation import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_CHANNEL_LENGTH,
    check_channel,
    check_optional_int,
    check_time,
)
from ..log import ChannelInfo, EventLog, Retention
from . import _import, _jsonl
from ._consumers import ConsumerAdmin
from ._errors import ChannelNotFound, EventNotFound
from ._limits import check_limit
from ._models import ChannelPage, EventPage, ImportResult, RetentionStats

if TYPE_CHECKING:
    from .._broadcast import Broadcast

_Admin = TypeVar("_Admin", bound="HistoryAdmin")
_T = TypeVar("_T")

#: Most message bytes one page of events carries (besides its first event), over HTTP
#: and in the CLI: 10,000 events of 1 MB each would be 10 GB in memory.
MAX_PAGE_BYTES = 8 * 1024 * 1024


def _check_time(name: str, value: datetime | None) -> None:
    if value is not None:
        check_time(name, value)


def _check_name_part(name: str, value: str | None) -> None:
    """A prefix or cursor: any text a channel name could start with."""
    if value is None:
        return
    if not isinstance(value, str) or len(value) > MAX_CHANNEL_LENGTH:
        raise InvalidArgument(f"{name} must be a str of at most {MAX_CHANNEL_LENGTH} characters")
    if value:
        check_channel(value)


class HistoryAdmin(ConsumerAdmin):
    """Operator queries over an event log: stats, pages, trim, delete, export, import,
    durable consumers.

    Args:
        log: The event log (``broadcast.log``); it must be connected when used.
        retention: The retention the broadcast applies, reported by
            :meth:`retention_stats`.
        max_message_size: Largest message an import may hold, in bytes.

    Example::

        admin = HistoryAdmin.of(broadcast)
        page = await admin.events("chat", order="desc", limit=20)
        older = await admin.events("chat", order="desc", before=page.next_cursor)
    """

    def __init__(
        self,
        log: EventLog,
        *,
        retention: Retention | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.log = log
        self.retention = retention
        self.max_message_size = max_message_size

    @classmethod
    def of(cls: type[_Admin], broadcast: Broadcast) -> _Admin:
        """The admin view of ``broadcast``'s log and settings."""
        return cls(
            broadcast.log,
            retention=broadcast.retention,
            max_message_size=broadcast.max_message_size,
        )

    # -- channels ------------------------------------------------------------------

    async def channel(self, name: str) -> ChannelInfo:
        """Stats of channel ``name``.

        Raises:
            ChannelNotFound: The log has no such channel.
            InvalidArgument: ``name`` is not a valid channel name.
        """
        check_channel(name)
        info = await self.log.channel(name)
        if info is None:
            raise ChannelNotFound(f"no channel {name!r} in the log")
        return info

    async def channels(
        self, *, prefix: str | None = None, after: str | None = None, limit: int = 100
    ) -> ChannelPage:
        """A page of channels with their stats, in name order.

        Args:
            prefix: Only names starting with it.
            after: Cursor: only names after it (``next_cursor`` of the previous page).
            limit: Page size (1 to 10 000).
        """
        _check_name_part("prefix", prefix)
        _check_name_part("after", after)
        check_limit(limit)
        found = await self.log.channels(prefix=prefix, after=after or None, limit=limit + 1)
        more = len(found) > limit
        found = found[:limit]
        return ChannelPage(found, found[-1].name if more else None)

    async def all_channels(self, *, prefix: str | None = None) -> AsyncIterator[ChannelInfo]:
        """Every channel (optionally under ``prefix``), read page by page."""
        async for page in self._channel_pages(prefix):
            for stats in page:
                yield stats

    async def _channel_pages(self, prefix: str | None) -> AsyncIterator[list[ChannelInfo]]:
        after: str | None = None
        while True:
            page = await self.channels(prefix=prefix, after=after, limit=500)
            yield page.channels
            if page.next_cursor is None:
                return
            after = page.next_cursor

    # -- events --------------------------------------------------------------------

    async def events(
        self,
        channel: str,
        *,
        after: int | None = None,
        before: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "asc",
        max_bytes: int | None = None,
    ) -> EventPage:
        """A page of stored events, by offset range and/or time range.

        Args:
            channel: The channel.
            after: Only offsets greater than this.
            before: Only offsets smaller than this.
            since: Only events at or after this time (aware datetime).
            until: Only events before this time (aware datetime).
            limit: Page size (1 to 10 000).
            order: ``"asc"`` (oldest first) or ``"desc"`` (newest first).
            max_bytes: At most this many bytes of messages per page (at least one
                event): a page cut short still has a ``next_cursor``.

        Returns:
            The page; its ``next_cursor`` goes in ``after=`` (ascending) or
            ``before=`` (descending), the other filters unchanged.

        Raises:
            ChannelNotFound: The log has no such channel.
            InvalidArgument: A bad filter.
        """
        check_channel(channel)
        check_optional_int("after", after)
        check_optional_int("before", before)
        _check_time("since", since)
        _check_time("until", until)
        check_limit(limit)
        if order not in ("asc", "desc"):
            raise InvalidArgument("order must be 'asc' or 'desc'")
        if await self.log.channel(channel) is None:
            raise ChannelNotFound(f"no channel {channel!r} in the log")
        found = await self.log.read(
            channel,
            after=after,
            before=before,
            since=since,
            until=until,
            limit=limit + 1,
            order=order,
            # The log stops at the first event that reaches its budget: one byte more
            # makes that the event passing ours, which then starts the next page.
            max_bytes=None if max_bytes is None else max_bytes + 1,
        )
        more = len(found) > limit
        page = found[:limit]
        if max_bytes is not None and len(page) > 1 and _size(page) > max_bytes:
            page.pop()
            more = True
        return EventPage(channel, page, order, page[-1].offset if more else None)

    async def event(self, channel: str, offset: int) -> Event:
        """The stored event at ``offset`` of ``channel``.

        Raises:
            ChannelNotFound: The log has no such channel.
            EventNotFound: No event is stored at that offset.
        """
        check_channel(channel)
        check_optional_int("offset", offset)
        found = await self.log.get(channel, offset)
        if found is not None:
            return found
        info = await self.log.channel(channel)
        if info is None:
            raise ChannelNotFound(f"no channel {channel!r} in the log")
        if offset < info.first_offset and offset >= 1:
            raise EventNotFound(f"event {offset} of {channel!r} was trimmed")
        raise EventNotFound(f"{channel!r} has no event {offset} (last is {info.last_offset})")

    # -- retention -----------------------------------------------------------------

    async def retention_stats(self) -> RetentionStats:
        """Totals over every channel, and the broadcast's retention settings."""
        totals = await self.log.totals()
        retention = self.retention or Retention()
        return RetentionStats(
            **asdict(totals), max_events=retention.max_events, max_age=retention.max_age
        )

    # -- changes -------------------------------------------------------------------

    async def trim(
        self, channel: str, *, before: int | None = None, before_time: datetime | None = None
    ) -> int:
        """Remove the events of ``channel`` below offset ``before`` and/or older than
        ``before_time``; returns how many were removed.

        Live subscribers are not disturbed; one positioned in the removed range gets
        :class:`~broadcast_history.HistoryTruncated` when it next reads the log.

        Raises:
            ChannelNotFound: The log has no such channel.
            InvalidArgument: Neither bound given, or a bad one.
        """
        check_channel(channel)
        check_optional_int("before", before)
        _check_time("before_time", before_time)
        if before is None and before_time is None:
            raise InvalidArgument("give before (an offset) and/or before_time (a datetime)")
        if await self.log.channel(channel) is None:
            raise ChannelNotFound(f"no channel {channel!r} in the log")
        return await self.log.trim(channel, before=before, before_time=before_time)

    async def delete(self, channel: str) -> None:
        """Delete ``channel`` and its history; its next publish starts a new epoch.

        Raises:
            ChannelNotFound: The log has no such channel.
        """
        check_channel(channel)
        if not await self.log.delete_channel(channel):
            raise ChannelNotFound(f"no channel {channel!r} in the log")

    # -- export / import -----------------------------------------------------------

    async def export_jsonl(
        self, channels: Sequence[str] | None = None, *, prefix: str | None = None
    ) -> AsyncGenerator[str, None]:
        """Lines (each ending in ``\\n``) of a JSON-lines export.

        Per channel: one ``{"type": "channel", ...}`` line, then its stored events in
        offset order as ``{"type": "event", ...}`` lines (``bytes`` payloads in base64);
        last, a ``{"type": "end", ...}`` line with their counts.

        Args:
            channels: These channels (``ChannelNotFound`` if one is missing); default
                every channel (under ``prefix``).
            prefix: With ``channels=None``: only channels starting with it.
        """
        if channels is not None:
            # A name given twice is exported once: twice, the import refuses the file.
            listed = _aiter([[await self.channel(name) for name in dict.fromkeys(channels)]])
        else:
            listed = self._channel_pages(prefix)
        exported = events = 0
        async for page in listed:
            async for info, fresh in _jsonl.as_now(self.log, page):
                lines = 0
                async for line in _jsonl.export_channel(self.log, info, fresh=fresh):
                    yield line
                    lines += 1
                if lines:  # none: deleted since it was listed
                    exported += 1
                    events += lines - 1  # all but its channel line
        yield _jsonl.end_line(exported, events)

    async def import_jsonl(
        self,
        lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
        *,
        new_epoch: bool = False,
    ) -> ImportResult:
        """Store an export made by :meth:`export_jsonl`, all or nothing.

        The whole input is checked before anything is written (and before the log's
        write lock is taken): each channel's events must run gap-free from its
        ``first_offset`` to its ``last_offset``. Offsets, epochs, timestamps, keys
        and payloads are stored as exported.

        Args:
            lines: The export's lines (``str`` or ``bytes``); for a raw byte stream,
                split it into lines first (a file opened in binary mode yields
                its lines).
            new_epoch: Give each channel a new epoch instead of the exported one:
                for restoring a backup older than what clients have seen, so their
                positions raise ``StreamReset`` instead of matching offsets that
                the next publishes reuse.

        Raises:
            ImportConflict: A channel of the export already exists in this log.
            InvalidExport: A malformed or incomplete export (the message gives the
                line number or the channel and the missing offsets).
        """
        return await _import.import_lines(
            self.log, lines, max_message_size=self.max_message_size, new_epochs=new_epoch
        )


def _size(events: Sequence[Event]) -> int:
    return sum(
        len(e.message.encode()) if isinstance(e.message, str) else len(e.message) for e in events
    )


async def _aiter(items: Iterable[_T]) -> AsyncIterator[_T]:
    for item in items:
        yield item
