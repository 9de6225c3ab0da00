"""Importing a JSON-lines export: checked completely first, then stored all at once.

The import runs in two phases. The first reads the whole input, checks every line
and spools the checked events to a temporary file, without holding any lock: a
client uploading slowly (or stalling) blocks nobody. Only once the input is known to
be complete and consistent does the second phase open the log's write transaction,
which then reads from the local spool at disk speed.

An export must be complete: each channel's events run gap-free from its
``first_offset`` to its ``last_offset``, and the file ends with the end line that
counts them (format 2; files of format 1, written before it, have none). A file cut
short (``head -n``), a missing line, a repeated offset or key are refused with the
line number, never stored. Exports joined with ``cat`` import as one: each end line
counts what came after the one before it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import pickle
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

from .._errors import InvalidArgument
from .._event import Event, from_micros, to_micros
from .._validation import MAX_INT, check_channel, check_key
from ..log import EPOCH_LIMIT, ChannelInfo, EventLog, new_epoch
from ._errors import InvalidExport
from ._jsonl import FORMAT
from ._models import ImportResult

#: Export formats read: 1 had no end line.
_FORMATS = (1, FORMAT)

_PAGE = 1000
# Channel lines read between two looks for the channels in the log.
_CHECK_EVERY = 500
# Checking between two turns given to the event loop: 4 MiB, each line counting its
# bytes plus 4 KiB (1,024 small lines, or 4 of 1 MiB). Checking an event line awaits
# nothing, and lines from a list or an open file (or an async iterable that never
# waits) held the loop for the whole check, seconds per million lines.
_PER_TURN = 4 * 1024 * 1024
_PER_LINE = 4096
_PAGE_BYTES = 4 * 1024 * 1024
# JSON escaping can make a message 6 times longer (``\u0001`` for one byte); keys,
# names and the other fields fit in the rest.
_LINE_OVERHEAD = 64 * 1024


def max_line_length(max_message_size: int) -> int:
    """Longest export line that can hold a message of ``max_message_size`` bytes."""
    return 6 * max_message_size + _LINE_OVERHEAD


async def split_lines(
    chunks: AsyncIterable[bytes] | Iterable[bytes], max_line: int
) -> AsyncIterator[bytes]:
    """The lines of a byte stream, without their newlines.

    Linear in the input (each byte is looked at once or twice); a line longer than
    ``max_line`` raises :class:`InvalidExport` before it is kept whole in memory.
    """
    buffer = bytearray()
    number = 1
    searched = 0

    async def chunked() -> AsyncIterator[bytes]:
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                yield chunk
        else:
            for chunk in chunks:
                yield chunk

    async for chunk in chunked():
        buffer += chunk
        start = 0
        while True:
            end = buffer.find(b"\n", searched)
            if end < 0:
                break
            yield bytes(buffer[start:end])
            number += 1
            start = searched = end + 1
        del buffer[:start]
        searched = len(buffer)
        if len(buffer) > max_line:
            raise InvalidExport(f"line {number}: longer than {max_line} bytes")
    if buffer:
        yield bytes(buffer)


def _int(
    line: dict[str, Any], name: str, number: int, minimum: int = 0, maximum: int = MAX_INT
) -> int:
    value = line.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidExport(f"line {number}: {name!r} must be an int from {minimum} to {maximum}")
    return value


def _format(line: dict[str, Any], number: int) -> int:
    # Without one: format 1 (hand-written lines, the oldest exports).
    fmt = line.get("format", 1)
    if isinstance(fmt, bool) or fmt not in _FORMATS:
        raise InvalidExport(f"line {number}: unsupported export format {line['format']!r}")
    return int(fmt)


def _epoch(line: dict[str, Any], number: int) -> int:
    # The log's epochs are below 2**53 so that JSON readers (JavaScript's numbers) keep
    # them exact; an import must not bring in one that a browser would round.
    return _int(line, "epoch", number, 1, EPOCH_LIMIT - 1)


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
        # OverflowError for a time whose UTC is past year 9999 (9999-12-31T23:59-01:00).
        micros = to_micros(moment.astimezone(timezone.utc))
    except (ValueError, OverflowError) as exc:
        raise InvalidExport(
            f"line {number}: {name!r} must be an ISO 8601 time with a timezone"
        ) from exc
    if micros < 0:
        # The log never stamps one (its clock is the wall clock), and a channel row's
        # last_timestamp of 0 means "no event yet".
        raise InvalidExport(f"line {number}: {name!r} must be a time from 1970-01-01T00:00:00Z on")
    return micros


def _message(line: dict[str, Any], number: int, max_size: int) -> str | bytes:
    encoding, text = line.get("encoding"), line.get("message")
    if not isinstance(text, str):
        raise InvalidExport(f"line {number}: 'message' must be a string")
    message: str | bytes
    if encoding == "text":
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:  # lone surrogates from \\ud800 escapes
            raise InvalidExport(f"line {number}: 'message' is not valid Unicode") from exc
        message = text
    elif encoding == "base64":
        try:
            message = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidExport(f"line {number}: 'message' is not valid base64") from exc
        size = len(message)
    else:
        raise InvalidExport(f"line {number}: 'encoding' must be 'text' or 'base64'")
    if size > max_size:
        raise InvalidExport(f"line {number}: the message is larger than {max_size} bytes")
    return message


def _parse(raw: str | bytes, number: int, max_line: int) -> dict[str, Any]:
    if len(raw) > max_line:
        raise InvalidExport(f"line {number}: longer than {max_line} bytes")
    try:
        line = json.loads(raw)
    except RecursionError as exc:
        raise InvalidExport(f"line {number}: nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidExport(f"line {number}: not JSON ({exc})") from exc
    if not isinstance(line, dict):
        raise InvalidExport(f"line {number}: expected a JSON object")
    if any(isinstance(value, (dict, list)) for value in line.values()):
        raise InvalidExport(f"line {number}: nested values are not part of the format")
    return line


@dataclass
class _Channel:
    """The channel whose event lines are being read."""

    info: ChannelInfo
    line: int
    next_offset: int
    # The epoch the file's lines carry (info.epoch, unless the import gives a new one).
    file_epoch: int
    # Where the channel's records start in the spool.
    spooled_from: int = 0
    last_micros: int = 0
    first_micros: int | None = None
    # Digests of the keys seen (see _key_digest): a set of the keys themselves grew
    # by ~300 bytes per 255-character key, 254 MB for 500,000 of them.
    keys: set[int] = field(default_factory=set)


def _key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class _Checker:
    """Phase one: checks each line and spools the events it describes."""

    def __init__(
        self, log: EventLog, spool: IO[bytes], max_message_size: int, new_epochs: bool
    ) -> None:
        self.log = log
        self.new_epochs = new_epochs
        self.spool = spool
        self.max_message_size = max_message_size
        self.max_line = max_line_length(max_message_size)
        self.current: _Channel | None = None
        self.infos: list[ChannelInfo] = []
        self.names: set[str] = set()
        # Names not yet looked up in the log (one lookup per name took 2.5 ms on SQLite).
        self.unchecked: list[str] = []
        self.events = 0
        # Since the last end line: channels and events read, and whether one of them
        # was of a format that must be followed by an end line.
        self.part_channels = self.part_events = 0
        self.part_needs_end = False
        self.last_line = 0
        # Checked since the event loop's last turn (see _PER_TURN).
        self.unyielded = 0

    async def line(self, raw: str | bytes, number: int) -> None:
        self.unyielded += len(raw) + _PER_LINE
        if self.unyielded >= _PER_TURN:
            self.unyielded = 0
            await asyncio.sleep(0)
        line = _parse(raw, number, self.max_line)
        kind = line.get("type")
        self.last_line = number
        if kind == "channel":
            await self.channel(line, number)
        elif kind == "event":
            self.event(line, number)
            self.part_events += 1
        elif kind == "end":
            self.end(line, number)
        elif kind == "error":
            raise InvalidExport(
                f"line {number}: the export stopped here, incomplete: {line.get('detail')}"
            )
        else:
            raise InvalidExport(f"line {number}: 'type' must be 'channel', 'event' or 'end'")

    async def channel(self, line: dict[str, Any], number: int) -> None:
        self.finish()
        fmt = _format(line, number)
        if fmt > 1 and not self.part_needs_end:
            # The first channel of an export with an end line (after an older export
            # joined with cat): its end line counts from here.
            self.part_channels = self.part_events = 0
            self.part_needs_end = True
        self.part_channels += 1
        try:
            name = check_channel(line.get("name"))
        except InvalidArgument as exc:
            raise InvalidExport(f"line {number}: {exc}") from exc
        if name in self.names:
            raise InvalidExport(f"line {number}: channel {name!r} appears twice")
        first = _int(line, "first_offset", number, 1)
        last = _int(line, "last_offset", number)
        if last >= MAX_INT:
            # The next offset, and the first one once all is trimmed, must fit too: a
            # channel at the largest one could neither be published to nor exported.
            raise InvalidExport(f"line {number}: last_offset must be below {MAX_INT}")
        if first > last + 1:
            raise InvalidExport(f"line {number}: first_offset is beyond last_offset + 1")
        last_micros = _optional_time(line, "last_timestamp", number)
        trimmed_micros = _optional_time(line, "trimmed_timestamp", number)
        if first == 1 and trimmed_micros is not None:
            raise InvalidExport(f"line {number}: trimmed_timestamp given, but nothing was trimmed")
        self.unchecked.append(name)
        if len(self.unchecked) >= _CHECK_EVERY:
            await self.refuse_existing()
        file_epoch = _epoch(line, number)
        info = ChannelInfo(
            name=name,
            epoch=new_epoch() if self.new_epochs else file_epoch,
            last_offset=last,
            first_offset=first,
            last_timestamp=None if not last_micros else from_micros(last_micros),
            trimmed_timestamp=None if trimmed_micros is None else from_micros(trimmed_micros),
        )
        self.names.add(name)
        self.current = _Channel(info, number, first, file_epoch, self.spool.tell())

    def event(self, line: dict[str, Any], number: int) -> None:
        current = self.current
        if current is None or line.get("channel") != current.info.name:
            raise InvalidExport(f"line {number}: an event must follow its channel's line")
        info = current.info
        offset = _int(line, "offset", number, 1)
        expected = current.next_offset
        if offset < expected:
            raise InvalidExport(f"line {number}: offset {offset} of {info.name!r} repeated")
        if offset > info.last_offset:
            raise InvalidExport(
                f"line {number}: offset {offset} is beyond the channel's last_offset "
                f"{info.last_offset}"
            )
        if offset > expected:
            raise InvalidExport(
                f"line {number}: events {expected}..{offset - 1} of {info.name!r} are missing"
            )
        if _epoch(line, number) != current.file_epoch:
            raise InvalidExport(f"line {number}: epoch differs from the channel's")
        micros = _time(line, "timestamp", number)
        if micros < current.last_micros:
            raise InvalidExport(f"line {number}: timestamp goes backwards")
        key = line.get("key")
        try:
            check_key(key)
        except InvalidArgument as exc:
            raise InvalidExport(f"line {number}: {exc}") from exc
        if key is not None:
            digest = _key_digest(key)
            if digest in current.keys and self.spooled_key(current, key):
                raise InvalidExport(f"line {number}: key {key!r} of {info.name!r} repeated")
            current.keys.add(digest)
        message = _message(line, number, self.max_message_size)
        current.next_offset = offset + 1
        current.last_micros = micros
        if current.first_micros is None:
            current.first_micros = micros
        self.spool.write(spooled((info.name, offset, info.epoch, micros, message, key)))
        self.events += 1

    async def refuse_existing(self) -> None:
        """ImportConflict if a channel read so far exists in the log. Checked again
        under the write lock: this only fails early, before the rest of the input."""
        names, self.unchecked = self.unchecked, []
        await self.log.refuse_existing(names)

    def spooled_key(self, current: _Channel, key: str) -> bool:
        """Whether the channel's spooled events hold ``key``: the exact check behind a
        digest seen before (two keys share one with odds of about 2^-64 per pair)."""
        end = self.spool.tell()
        try:
            self.spool.seek(current.spooled_from)
            return any(record[5] == key for record in _records(self.spool))
        finally:
            self.spool.seek(end)

    def end(self, line: dict[str, Any], number: int) -> None:
        """An end line: it counts the channels and events since the one before."""
        self.finish()
        _format(line, number)
        for name, read in (("channels", self.part_channels), ("events", self.part_events)):
            if _int(line, name, number) != read:
                raise InvalidExport(
                    f"line {number}: the end line counts {line[name]} {name}, "
                    f"{read} were read: the export is incomplete"
                )
        self.part_channels = self.part_events = 0
        self.part_needs_end = False

    def complete(self) -> None:
        """At the end of the input: what needs an end line has had it."""
        if not self.last_line:
            # Every export has its end line, even of an empty log: nothing at all is a
            # backup missing (``import <(zcat gone.gz)``), not one of nothing.
            raise InvalidExport(
                "the input is empty: an export has at least its end line (one of format 1, "
                "which had none, of an empty log holds nothing to import)"
            )
        self.finish()
        if self.part_needs_end:
            raise InvalidExport(
                f"no end line after line {self.last_line}: the export was cut short "
                f"({self.part_channels} channels, {self.part_events} events since the "
                "last end line or the start)"
            )

    def finish(self) -> None:
        """End the current channel: its events must have reached its last offset."""
        current, self.current = self.current, None
        if current is None:
            return
        info = current.info
        if current.next_offset != info.last_offset + 1:
            raise InvalidExport(
                f"channel {info.name!r} (line {current.line}): events "
                f"{current.next_offset}..{info.last_offset} are missing; the export is "
                "incomplete (cut short?)"
            )
        if current.first_micros is not None:
            # The log stamps a channel with its newest event's time and never an event
            # before it: a later one (a hand-edited file, or stored by an earlier
            # version's import) would pin every next publish's timestamp to it.
            last_micros = current.last_micros
        else:  # every event trimmed: the line's time is the only one known
            last_micros = 0 if info.last_timestamp is None else to_micros(info.last_timestamp)
        # since=<a time> raises HistoryTruncated up to the newest trimmed event's time:
        # never after the oldest kept event's; unknown (an older export), assume it.
        kept_from = last_micros if current.first_micros is None else current.first_micros
        trimmed = info.trimmed_timestamp
        if trimmed is not None and to_micros(trimmed) > kept_from:
            raise InvalidExport(
                f"channel {info.name!r} (line {current.line}): trimmed_timestamp is later "
                "than the events kept"
            )
        if trimmed is None and info.first_offset > 1 and kept_from:
            trimmed = from_micros(kept_from)
        self.infos.append(
            ChannelInfo(
                info.name,
                info.epoch,
                info.last_offset,
                info.first_offset,
                from_micros(last_micros) if last_micros else info.last_timestamp,
                trimmed,
            )
        )


class _Primitives(pickle.Unpickler):
    """Reads back the spool's pickles: tuples of str, bytes, int and None, which the
    process wrote to its own temporary file. A pickle naming any class or function
    (none does) is refused rather than loaded."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the import's spool holds {module}.{name}")


#: Pickle protocol of the spool's records. Up to 3, a pickle numbers the objects it
#: remembers itself (PUT n, GET n); from 4 on the reader numbers them as it goes
#: (MEMOIZE). One unpickler reads the whole spool, and each record is pickled on its
#: own: with protocol 4 and up, a record's repeated value ("y" as message and key)
#: came back as an object of an earlier record (a wrong key or message, stored
#: without a word), and the reader kept every message read. With 3 its memo holds a
#: few objects, the last under each number (one can be an older record's message).
#: An unpickler per record avoided that too, at 1.6 s per million records against 0.4.
_PROTOCOL = 3


def spooled(record: tuple[str, int, int, int, str | bytes, str | None]) -> bytes:
    """A checked event as the spool holds it: channel, offset, epoch, microseconds,
    message, key."""
    return pickle.dumps(record, _PROTOCOL)


def _records(spool: IO[bytes]) -> Iterator[tuple[Any, ...]]:
    """The records of the spool from where it is to its end."""
    # Pickles, not JSON lines (and base64): read 3 times faster, while the import
    # holds the log's write lock.
    load = _Primitives(spool).load
    while True:
        try:
            yield load()
        except EOFError:
            return


async def _spooled(spool: IO[bytes]) -> AsyncIterator[list[Event]]:
    """The checked events, in pages of at most ``_PAGE`` events and about
    ``_PAGE_BYTES`` of messages (a page of 1,000 events of 1 MiB took 1 GB)."""
    spool.seek(0)
    page: list[Event] = []
    size = 0
    last_micros, stamp = -1, from_micros(0)
    for name, offset, epoch, micros, message, key in _records(spool):
        if micros != last_micros:  # a group commit stamps its events alike
            last_micros, stamp = micros, from_micros(micros)
        page.append(Event(name, message, offset, stamp, epoch, key))
        size += len(message)
        if len(page) >= _PAGE or size >= _PAGE_BYTES:
            yield page
            page, size = [], 0
    if page:
        yield page


async def import_lines(
    log: EventLog,
    lines: Iterable[str | bytes] | AsyncIterable[str | bytes],
    *,
    max_message_size: int,
    new_epochs: bool = False,
) -> ImportResult:
    """Check a whole export, then store it in one transaction: all of it or nothing."""
    with tempfile.TemporaryFile(prefix="broadcast-history-import-") as spool:
        checker = _Checker(log, spool, max_message_size, new_epochs)
        number = 0
        if isinstance(lines, AsyncIterable):
            async for raw in lines:
                number += 1
                if raw.strip():
                    await checker.line(raw, number)
        else:
            for raw in lines:
                number += 1
                if raw.strip():
                    await checker.line(raw, number)
        checker.complete()
        await checker.refuse_existing()
        stored = await log.restore(checker.infos, _spooled(spool))
    return ImportResult(channels=[info.name for info in checker.infos], events=stored)
