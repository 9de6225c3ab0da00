"""Where a subscription starts: ``since``/``history``/``epoch`` against the log."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from ._errors import HistoryTruncated, StreamReset
from ._validation import check_served
from .log import ChannelInfo, EventLog


class Start(NamedTuple):
    """The first offset to deliver, the channel's epoch (if it exists) and its head."""

    offset: int
    epoch: int | None
    head: int


async def resolve_start(
    log: EventLog,
    channel: str,
    info: ChannelInfo | None,
    since: int | datetime | None,
    history: int | None,
    epoch: int | None,
) -> Start:
    """Check a start position against the log, as ``subscribe`` promises.

    Raises:
        StreamReset: ``epoch`` is not the channel's current epoch.
        OffsetOutOfRange: ``since`` is negative or beyond the head.
        HistoryTruncated: Events after ``since`` were removed.
    """
    head = info.last_offset if info is not None else 0
    first = info.first_offset if info is not None else 1
    if epoch is not None and (info is None or info.epoch != epoch):
        current = "no history" if info is None else f"epoch {info.epoch}"
        raise StreamReset(
            f"channel {channel!r} was reset: asked for epoch {epoch}, it has {current}"
        )
    current_epoch = info.epoch if info is not None else None
    if isinstance(since, datetime):
        trimmed = info.trimmed_timestamp if info is not None else None
        if trimmed is not None and trimmed >= since:
            raise HistoryTruncated(f"events of {channel!r} since {since.isoformat()} were trimmed")
        found = await log.offset_at(channel, since) if info else None
        return Start(head + 1 if found is None else found, current_epoch, head)
    if since is not None:
        check_served(channel, since, first, head)
        return Start(since + 1, current_epoch, head)
    if history is not None:
        return Start(max(first, head - history + 1), current_epoch, head)
    return Start(head + 1, current_epoch, head)
