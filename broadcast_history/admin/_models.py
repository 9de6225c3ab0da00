"""Values returned by the admin query layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from .._event import Event
from ..log import ChannelInfo, LogTotals

#: The stats of a channel are the log's :class:`ChannelInfo` (offsets, count, times).
ChannelStats = ChannelInfo


@dataclass(frozen=True, slots=True)
class ChannelPage:
    """One page of channels in name order.

    Attributes:
        channels: The channels of this page.
        next_cursor: Pass as ``after=`` to get the next page; ``None`` on the last page.
    """

    channels: list[ChannelInfo]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of events.

    Attributes:
        channel: The channel read.
        events: The events, in the order asked for.
        order: ``"asc"`` or ``"desc"``.
        next_cursor: Offset to pass as ``after=`` (ascending) or ``before=``
            (descending) for the next page; ``None`` when there is no more.
    """

    channel: str
    events: list[Event]
    order: Literal["asc", "desc"]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class RetentionStats(LogTotals):
    """How much history the log holds (:class:`LogTotals`), and the retention
    settings of the broadcast.

    Attributes:
        max_events: Retention setting of the broadcast (if known).
        max_age: Retention setting of the broadcast (if known).
    """

    max_events: int | None = None
    max_age: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What an import stored.

    Attributes:
        channels: Names of the channels created, in file order.
        events: Number of events stored.
    """

    channels: list[str] = field(default_factory=list)
    events: int = 0
