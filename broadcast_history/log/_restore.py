"""Restoring exported channels: their rows stored exactly as they were exported."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import ImportConflict
from .._event import Event, to_micros
from ._info import ChannelInfo
from ._schema import channels, events

_CHUNK = 500


async def restore(
    conn: AsyncConnection,
    infos: Sequence[ChannelInfo],
    pages: AsyncIterable[Sequence[Event]],
) -> int:
    """Insert ``infos`` and the events of ``pages`` in ``conn``'s write transaction.

    The caller has checked the export is complete and consistent; this only refuses
    channels that exist. Returns the number of events stored.

    Raises:
        ImportConflict: One of the channels already exists.
    """
    names = [info.name for info in infos]
    for start in range(0, len(names), _CHUNK):
        found = await conn.execute(
            select(channels.c.name, channels.c.epoch, channels.c.last_offset).where(
                channels.c.name.in_(names[start : start + _CHUNK])
            )
        )
        row = found.first()
        if row is not None:
            raise ImportConflict(
                f"channel {row[0]!r} already exists in this log (epoch {row[1]}, offsets "
                f"up to {row[2]}); nothing was imported: delete it first or import into "
                "another log"
            )
    stored = 0
    async for page in pages:
        if page:
            await conn.execute(events.insert(), [_event_row(event) for event in page])
            stored += len(page)
    if infos:
        await conn.execute(channels.insert(), [_channel_row(info) for info in infos])
    return stored


def _event_row(event: Event) -> dict[str, Any]:
    message = event.message
    is_text = isinstance(message, str)
    return {
        "channel": event.channel,
        "offset": event.offset,
        "epoch": event.epoch,
        "timestamp": 0 if event.timestamp is None else to_micros(event.timestamp),
        "is_text": is_text,
        "payload": message.encode() if is_text else message,
        "key": event.key,
    }


def _channel_row(info: ChannelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "epoch": info.epoch,
        "last_offset": info.last_offset,
        "first_offset": info.first_offset,
        "last_timestamp": 0 if info.last_timestamp is None else to_micros(info.last_timestamp),
        "trimmed_timestamp": (
            None if info.trimmed_timestamp is None else to_micros(info.trimmed_timestamp)
        ),
    }
