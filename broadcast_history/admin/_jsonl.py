"""JSON shapes of events and channels, and the JSON-lines export format.

An export is, per channel, one channel line then its events in offset order::

    {"type": "channel", "format": 1, "name": "chat", "epoch": 7, "first_offset": 1,
     "last_offset": 2, "last_timestamp": "2024-05-01T12:00:00.000002+00:00",
     "trimmed_timestamp": null}
    {"type": "event", "channel": "chat", "offset": 1, "epoch": 7, "timestamp": "...",
     "key": null, "encoding": "text", "message": "hello"}
    {"type": "event", ..., "encoding": "base64", "message": "AAEC"}

and last an end line counting them, without which a file cut at a channel's boundary
(``head -n``, a disk that filled, a stream that broke) would read as whole::

    {"type": "end", "format": 2, "channels": 1, "events": 2}

An HTTP export that stops midway ends with an error line instead, and no end line::

    {"type": "error", "detail": "'chat' was trimmed during the export: export again"}

Timestamps are ISO 8601 with microseconds, which is exactly what the log stores.
``_import`` reads the format back (format 1, from before the end line, too).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from .._errors import HistoryTruncated, StreamReset
from .._event import Event
from ..log import ChannelInfo, EventLog

FORMAT = 2
_PAGE = 1000
# A page in memory stays small whatever the messages' sizes (at least one event).
_PAGE_BYTES = 4 * 1024 * 1024


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def event_json(event: Event) -> dict[str, Any]:
    """The JSON object of an event (used by the HTTP API, the CLI and exports)."""
    message = event.message
    if isinstance(message, str):
        encoding, text = "text", message
    else:
        encoding, text = "base64", base64.b64encode(message).decode("ascii")
    return {
        "channel": event.channel,
        "offset": event.offset,
        "epoch": event.epoch,
        "timestamp": _iso(event.timestamp),
        "key": event.key,
        "encoding": encoding,
        "message": text,
    }


def _dumps(value: dict[str, Any]) -> str:
    # ensure_ascii keeps each line plain ASCII: safe whatever the reader's encoding.
    return json.dumps(value, separators=(",", ":")) + "\n"


def end_line(channels: int, events: int) -> str:
    """The line that ends an export of ``channels`` channels and ``events`` events."""
    return _dumps({"type": "end", "format": FORMAT, "channels": channels, "events": events})


def error_line(detail: str) -> str:
    """The last line of an export that stopped midway (sent over HTTP, where the
    status went out with the first line): why, for whoever reads the file."""
    return _dumps({"type": "error", "detail": detail})


async def as_now(
    log: EventLog, listed: Sequence[ChannelInfo]
) -> AsyncIterator[tuple[ChannelInfo, bool]]:
    """The channels of a listing to export, each with whether it was just read.

    A channel whose events were all trimmed has none whose reading would tell that it
    changed since the listing: it is read again, and left out if it was deleted.
    Such channels in a row (per-session channels leave many) are read RUN at a time,
    when the export reaches the first of them, and again once that read is FRESH
    seconds old: one query each cost more than the rest of the export.
    """
    now: dict[str, ChannelInfo | None] = {}
    read_at = 0.0
    for index, info in enumerate(listed):
        if info.first_offset <= info.last_offset:
            yield info, False
            continue
        if info.name not in now or time.monotonic() - read_at > FRESH:
            end, last = index + 1, min(index + RUN, len(listed))
            while end < last and listed[end].first_offset > listed[end].last_offset:
                end += 1
            run = [each.name for each in listed[index:end]]
            found = await log.channels_named(run)
            read_at = time.monotonic()
            now = {name: found.get(name) for name in run}
        current = now[info.name]
        if current is not None:
            yield current, True


#: Fully trimmed channels read again per query by :func:`as_now`, and how long, in
#: seconds, what it read is taken for their state now.
RUN = 100
FRESH = 1.0


async def export_channel(
    log: EventLog, info: ChannelInfo, *, fresh: bool = False
) -> AsyncIterator[str]:
    """The export lines of one channel, read page by page, as ``info`` (a listing)
    describes it; as it is now if it changed since (nothing if it was deleted).
    ``fresh``: ``info`` was just read, there is nothing to check."""
    first = None
    if info.first_offset <= info.last_offset:
        first = await _page(log, info, info.first_offset - 1)
    elif fresh:
        first = []
    if first is None:
        # Trimmed, deleted or deleted and used again since it was listed: a listing
        # of many channels is old by the time it reaches the last ones.
        now = await log.channel(info.name)
        if now is None:
            return
        info = now
        first = await _page(log, info, info.first_offset - 1)
        if first is None:
            raise await _changed(log, info)
    yield _dumps(
        {
            "type": "channel",
            "format": FORMAT,
            "name": info.name,
            "epoch": info.epoch,
            "first_offset": info.first_offset,
            "last_offset": info.last_offset,
            "last_timestamp": _iso(info.last_timestamp),
            "trimmed_timestamp": _iso(info.trimmed_timestamp),
        }
    )
    page: list[Event] | None = first
    while page:
        for event in page:
            yield _dumps({"type": "event", **event_json(event)})
        after = page[-1].offset
        if after >= info.last_offset:
            return
        page = await _page(log, info, after)
        if page is None:
            # Trimmed or deleted since the channel line: the file would have a hole.
            raise await _changed(log, info)


async def _page(log: EventLog, info: ChannelInfo, after: int) -> list[Event] | None:
    """The events of ``info``'s channel after ``after`` up to its last offset (a page
    of them), or ``None`` if the log no longer has them as ``info`` says."""
    if after >= info.last_offset:
        return []  # every event trimmed: the channel line alone
    # The replay's query (compiled once), not read()'s: a log of many small channels
    # reads one page per channel, and compiling each cost more than running it.
    page = await log.read_from(
        info.name, after + 1, min(_PAGE, info.last_offset - after), _PAGE_BYTES
    )
    # One statement reads one epoch: its first and last events tell for all.
    if not page or page[0].offset != after + 1 or page[-1].epoch != info.epoch:
        return None
    return page


async def _changed(log: EventLog, info: ChannelInfo) -> HistoryTruncated | StreamReset:
    now = await log.channel(info.name)
    if now is None or now.epoch != info.epoch:
        return StreamReset(f"{info.name!r} was deleted during the export: export again")
    return HistoryTruncated(f"{info.name!r} was trimmed during the export: export again")
