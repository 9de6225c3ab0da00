"""JSON shapes of events and channels, and the JSON-lines export/import format.

An export is, per channel, one channel line then its events in offset order::

    {"type": "channel", "format": 1, "name": "chat", "epoch": 7, "first_offset": 1,
     "last_offset": 2, "last_timestamp": "2024-05-01T12:00:00.000002+00:00",
     "trimmed_timestamp": null}
    {"type": "event", "channel": "chat", "offset": 1, "epoch": 7, "timestamp": "...",
     "key": null, "encoding": "text", "message": "hello"}
    {"type": "event", ..., "encoding": "base64", "message": "AAEC"}

Timestamps are ISO 8601 with microseconds, which is exactly what the log stores.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import HistoryTruncated, InvalidArgument, StreamReset
from .._event import Event, to_micros
from .._validation import check_channel, check_key
from ..log import ChannelInfo, EventLog
from ..log._schema import channels, events
from ._errors import ImportConflict, InvalidExport
from ._models import ImportResult

FORMAT = 1
_PAGE = 1000
_MAX_INT = 2**63 - 1


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


async def export_channel(log: EventLog, info: ChannelInfo) -> AsyncIterator[str]:
    """The export lines of one channel, read page by page."""
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
    after, expected = info.first_offset - 1, None
    while True:
        page = await log.read(info.name, after=after, before=info.last_offset + 1, limit=_PAGE)
        if not page:
            return
        if expected is not None and page[0].offset != expected:
            # Trimmed between two pages: the file would have a hole; better say so.
            raise HistoryTruncated(f"{info.name!r} was trimmed during the export: export again")
        for event in page:
            if event.epoch != info.epoch:
                raise StreamReset(f"{info.name!r} was deleted during the export: export again")
            yield _dumps({"type": "event", **event_json(event)})
        after = page[-1].offset
        expected = after + 1
        if len(page) < _PAGE:
            return


# -- import ------------------------------------------------------------------------


def _int(line: dict[str, Any], name: str, number: int, minimum: int = 0) -> int:
    value = line.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_INT:
        raise InvalidExport(f"line {number}: {name!r} must be an int >= {minimum}")
    return value


def _optional_time(line: dict[str, Any], name: str, number: int) -> int | None:
    return None if line.get(name) is None else _time(line, name, number)


def _time(line: dict[str, Any], name: str, number: int) -> int:
    value = line.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(value)
        return to_micros(moment)
    except (ValueError, OverflowError) as exc:
        raise InvalidExport(
            f"line {number}: {name!r} must be an ISO 8601 time with a timezone"
        ) from exc


def _payload(line: dict[str, Any], number: int) -> tuple[bool, bytes]:
    encoding, message = line.get("encoding"), line.get("message")
    if not isinstance(message, str):
        raise InvalidExport(f"line {number}: 'message' must be a string")
    if encoding == "text":
        try:
            return True, message.encode()
        except UnicodeEncodeError as exc:  # lone surrogates from \\ud800 escapes
            raise InvalidExport(f"line {number}: 'message' is not valid Unicode") from exc
    if encoding == "base64":
        try:
            return False, base64.b64decode(message, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidExport(f"line {number}: 'message' is not valid base64") from exc
    raise InvalidExport(f"line {number}: 'encoding' must be 'text' or 'base64'")


@dataclass
class _Channel:
    """The channel being imported, stored once its events are in."""

    name: str
    epoch: int
    first_offset: int
    last_offset: int
    last_timestamp: int
    trimmed_timestamp: int | None
    first_seen: int | None = None
    next_offset: int | None = None
    last_seen_timestamp: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


class _Importer:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.current: _Channel | None = None
        self.result = ImportResult()

    async def line(self, raw: str | bytes, number: int) -> None:
        try:
            line = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidExport(f"line {number}: not JSON ({exc})") from exc
        if not isinstance(line, dict):
            raise InvalidExport(f"line {number}: expected a JSON object")
        kind = line.get("type")
        if kind == "channel":
            await self.channel(line, number)
        elif kind == "event":
            await self.event(line, number)
        else:
            raise InvalidExport(f"line {number}: 'type' must be 'channel' or 'event'")

    async def channel(self, line: dict[str, Any], number: int) -> None:
        await self.finish()
        if line.get("format", FORMAT) != FORMAT:
            raise InvalidExport(f"line {number}: unsupported export format {line['format']!r}")
        try:
            name = check_channel(line.get("name"))
        except InvalidArgument as exc:
            raise InvalidExport(f"line {number}: {exc}") from exc
        if name in self.result.channels:
            raise InvalidExport(f"line {number}: channel {name!r} appears twice")
        first = _int(line, "first_offset", number, 1)
        last = _int(line, "last_offset", number)
        if first > last + 1:
            raise InvalidExport(f"line {number}: first_offset is beyond last_offset + 1")
        found = await self.conn.execute(
            select(channels.c.epoch, channels.c.last_offset).where(channels.c.name == name)
        )
        existing = found.first()
        if existing is not None:
            raise ImportConflict(
                f"channel {name!r} already exists in this log (epoch {existing[0]}, "
                f"offsets up to {existing[1]}); nothing was imported: delete it first "
                "or import into another log"
            )
        self.current = _Channel(
            name=name,
            epoch=_int(line, "epoch", number, 1),
            first_offset=first,
            last_offset=last,
            last_timestamp=_optional_time(line, "last_timestamp", number) or 0,
            trimmed_timestamp=_optional_time(line, "trimmed_timestamp", number),
        )
        self.result.channels.append(name)

    async def event(self, line: dict[str, Any], number: int) -> None:
        current = self.current
        if current is None or line.get("channel") != current.name:
            raise InvalidExport(f"line {number}: an event must follow its channel's line")
        offset = _int(line, "offset", number, 1)
        if current.next_offset is None:
            if not current.first_offset <= offset <= current.last_offset:
                raise InvalidExport(f"line {number}: offset {offset} is outside the channel")
            current.first_seen = offset
        elif offset != current.next_offset or offset > current.last_offset:
            raise InvalidExport(
                f"line {number}: offset {offset} where {current.next_offset} was expected"
            )
        if _int(line, "epoch", number, 1) != current.epoch:
            raise InvalidExport(f"line {number}: epoch differs from the channel's")
        micros = _time(line, "timestamp", number)
        if micros < current.last_seen_timestamp:
            raise InvalidExport(f"line {number}: timestamp goes backwards")
        key = line.get("key")
        try:
            check_key(key)
        except InvalidArgument as exc:
            raise InvalidExport(f"line {number}: {exc}") from exc
        is_text, payload = _payload(line, number)
        current.next_offset = offset + 1
        current.last_seen_timestamp = micros
        current.rows.append(
            {
                "channel": current.name,
                "offset": offset,
                "epoch": current.epoch,
                "timestamp": micros,
                "is_text": is_text,
                "payload": payload,
                "key": key,
            }
        )
        if len(current.rows) >= _PAGE:
            await self.flush(current)

    async def flush(self, current: _Channel) -> None:
        if current.rows:
            await self.conn.execute(events.insert(), current.rows)
            self.result.events += len(current.rows)
            current.rows = []

    async def finish(self) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        await self.flush(current)
        first = current.last_offset + 1 if current.first_seen is None else current.first_seen
        await self.conn.execute(
            channels.insert().values(
                name=current.name,
                epoch=current.epoch,
                last_offset=current.last_offset,
                first_offset=first,
                last_timestamp=max(current.last_timestamp, current.last_seen_timestamp),
                trimmed_timestamp=current.trimmed_timestamp,
            )
        )


async def _numbered(
    lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
) -> AsyncIterator[tuple[int, str | bytes]]:
    if isinstance(lines, AsyncIterable):
        number = 0
        async for line in lines:
            number += 1
            yield number, line
    else:
        for number, line in enumerate(lines, 1):
            yield number, line


async def import_lines(
    log: EventLog, lines: Iterable[str | bytes] | AsyncIterable[str | bytes]
) -> ImportResult:
    """Store an export in one transaction: every channel of it, or nothing."""
    try:
        async with log.transaction(write=True) as conn:
            importer = _Importer(conn)
            async for number, raw in _numbered(lines):
                if raw.strip():
                    await importer.line(raw, number)
            await importer.finish()
            return importer.result
    except IntegrityError as exc:
        # A publisher created one of the channels while the import ran.
        raise ImportConflict(f"a channel of the import was created meanwhile: {exc.orig}") from exc
