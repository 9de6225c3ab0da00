"""Text to positions: what HTTP query strings, headers and the command line say.

One parser for every face of the library, so ``since=3`` means the same thing (an
offset) in the admin API, the streaming endpoints, the demo and the CLI, and every
integer is checked against the 64-bit range in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ._errors import InvalidArgument
from ._validation import MAX_INT


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream starts: the arguments of ``Broadcast.subscribe``.

    Attributes:
        since: An offset (events after it) or a time (events at or after it).
        history: The last ``history`` events.
        epoch: The epoch ``since`` belongs to (from an ``epoch:offset`` id).
    """

    since: int | datetime | None = None
    history: int | None = None
    epoch: int | None = None


def parse_int(text: str, what: str) -> int:
    """A non-negative decimal integer of at most 2**63 - 1."""
    text = text.strip()
    # Leading zeros do not count towards the 19 digits ("0001" is 1), and are gone
    # before int() sees the text: it refuses more than 4,300 digits (ValueError).
    digits = text.lstrip("0") or "0"
    if not text.isascii() or not text.isdigit() or len(digits) > 19 or int(digits) > MAX_INT:
        raise InvalidArgument(f"{what} must be an integer from 0 to {MAX_INT}, got {text[:40]!r}")
    return int(digits)


# The ISO 8601 times taken: a calendar date, then optionally a time after T or a
# space, then a zone (Z, or an offset of hours, minutes and seconds, as isoformat()
# writes it; a space may come before it); all extended (2026-11-28T10:00:00) or all
# basic (20261128T100000). Python's fromisoformat (3.11) takes any character between
# date and time, so "2026-11-28Z" read as a naive date and "2026-11-28+02:00" as
# 02:00 with no zone; a date with a zone is its midnight here.
_ZONE = (
    r"\s?(?:(?P<utc>[Zz])|(?P<sign>[+-])(?P<zh>\d{2})"
    r"(?::?(?P<zm>\d{2})(?::?(?P<zs>\d{2})(?:\.\d+)?)?)?)?"
)
_FRACTION = r"(?:[.,](?P<fraction>\d+))?"
_ISO_TIMES = [
    re.compile(pattern + _ZONE, re.ASCII)
    for pattern in (
        r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
        r"(?:[Tt ](?P<h>\d{2})(?::(?P<mi>\d{2})(?::(?P<s>\d{2})" + _FRACTION + ")?)?)?",
        r"(?P<y>\d{4})(?P<mo>\d{2})(?P<d>\d{2})"
        r"(?:[Tt ](?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})" + _FRACTION + ")?)?)?",
    )
]


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time with a timezone (``Z`` accepted); naive times are refused."""
    text = text.strip()
    match = next(filter(None, (form.fullmatch(text) for form in _ISO_TIMES)), None)
    refused = InvalidArgument(f"{what} must be an ISO 8601 time, got {text[:60]!r}")
    if match is None:
        raise refused
    part = match.groupdict()
    if part["utc"] is None and part["sign"] is None:
        raise InvalidArgument(f"{what}: naive times are refused; give a timezone (e.g. Z)")
    try:
        zone = timezone.utc
        if part["sign"] is not None:
            minutes, seconds = int(part["zm"] or 0), int(part["zs"] or 0)
            if minutes > 59 or seconds > 59:
                raise refused
            shift = timedelta(hours=int(part["zh"]), minutes=minutes, seconds=seconds)
            zone = timezone(-shift if part["sign"] == "-" else shift)
        return datetime(
            int(part["y"]),
            int(part["mo"]),
            int(part["d"]),
            int(part["h"] or 0),
            int(part["mi"] or 0),
            int(part["s"] or 0),
            int((part["fraction"] or "").ljust(6, "0")[:6]),
            tzinfo=zone,
        )
    except ValueError:  # a day, hour or zone out of range
        raise refused from None


def parse_since(text: str, what: str = "since") -> int | datetime:
    """An offset (digits) or an ISO 8601 time."""
    stripped = text.strip()
    if stripped.isascii() and stripped.isdigit():
        return parse_int(stripped, what)
    if stripped[:1] in ("-", "+") and stripped[1:].isascii() and stripped[1:].isdigit():
        # "-1" is no time either: say what an offset may be.
        raise InvalidArgument(
            f"{what} must be an offset from 0 to {MAX_INT} or an ISO 8601 time, got {text!r}"
        )
    return parse_time(stripped, what)


def parse_event_id(text: str, what: str = "Last-Event-ID") -> tuple[int | None, int]:
    """``"<epoch>:<offset>"`` (or a bare offset) as ``(epoch, offset)``."""
    epoch_text, sep, offset_text = text.strip().rpartition(":")
    try:
        offset = parse_int(offset_text, what)
        return (parse_int(epoch_text, f"{what} epoch") if sep else None), offset
    except InvalidArgument as exc:
        # Said as a whole: "must be an integer" misled for an id of two parts.
        raise InvalidArgument(
            f"{what} must be <epoch>:<offset> or an offset (integers from 0 to {MAX_INT}), "
            f"got {text[:60]!r}"
        ) from exc


def format_event_id(epoch: int, offset: int) -> str:
    """The ``"<epoch>:<offset>"`` id of an event, as streams send it."""
    return f"{epoch}:{offset}"


def parse_position(
    *,
    last_event_id: str | None = None,
    since: str | None = None,
    history: str | int | None = None,
) -> Position:
    """The start position of a stream from its request.

    ``last_event_id`` wins: it is what a reconnecting client sends, and it knows
    better than the query string of the first connection. ``since`` and ``history``
    together are refused.
    """
    if last_event_id:
        epoch, offset = parse_event_id(last_event_id)
        return Position(since=offset, epoch=epoch)
    if since is not None and history is not None:
        raise InvalidArgument("give since or history, not both")
    if since is not None:
        return Position(since=parse_since(since))
    if history is not None:
        count = history if isinstance(history, int) else parse_int(history, "history")
        if isinstance(count, bool) or not 0 <= count <= MAX_INT:
            raise InvalidArgument(f"history must be an integer from 0 to {MAX_INT}")
        return Position(history=count)
    return Position()
