"""The envelope: how stored events travel on a live transport.

A transport only moves text. An envelope carries one or more events of one channel,
with the offsets and epoch the log gave them, so a subscriber can order, de-duplicate
and detect gaps without trusting the transport. Format (version 2)::

    bh2:<log id>:<sender>:[epoch, [[offset, timestamp_us, kind, payload, key], ...]]

The log id names the log that stored the events: offsets and epochs only mean
something in that log, so a receiver ignores envelopes of any other log (processes
sharing a transport but not a log) instead of mixing two numberings. The sender (a
random id per broadcast, or empty) lets a process skip its own envelopes coming back
from the transport without decoding them: it delivered those events already.

``kind`` is ``"s"`` (text payload), ``"b"`` (bytes, base64) or ``"n"`` (a notice: the
event exists but its payload did not fit the transport; its message decodes as
``NOTICE`` and subscribers read it from the log).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

from ._event import NOTICE, Event, from_micros, stored_event, to_micros

PREFIX: Final = "bh2:"


class NotAnEnvelope(ValueError):
    """The message was not written by broadcast_history (or by an older version)."""


class OtherLog(ValueError):
    """The envelope carries events of another log than the receiver's."""

    def __init__(self, log_id: str) -> None:
        super().__init__(f"an envelope of log {log_id!r}")
        self.log_id = log_id


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _record(event: Event) -> list[Any]:
    micros = to_micros(event.timestamp) if event.timestamp is not None else 0
    message = event.message
    if isinstance(message, str):
        return [event.offset, micros, "s", message, event.key]
    return [event.offset, micros, "b", base64.b64encode(message).decode("ascii"), event.key]


def encode(
    events: Sequence[Event], log_id: str, max_size: int | None = None, sender: str = ""
) -> list[str]:
    """Encode events of one channel into envelopes.

    Args:
        events: Stored events of a single channel, in offset order.
        log_id: Identity of the log that stored them.
        sender: Identity of the sending broadcast (no ``:`` in it).
        max_size: Largest envelope the transport accepts, in UTF-8 bytes. Events
            that cannot fit alone are sent as notices; otherwise events are
            packed into as few envelopes as fit.
    """
    if not events:
        return []
    epoch = events[0].epoch
    head = f"{PREFIX}{log_id}:{sender}:"
    if max_size is None:
        return [head + _dumps([epoch, [_record(e) for e in events]])]
    # What is left for records once the frame (prefix, id, epoch, brackets) is paid for.
    budget = max_size - 64 - len(head)
    envelopes: list[str] = []
    batch: list[list[Any]] = []
    size = 0
    for event in events:
        record = _record(event)
        record_size = len(_dumps(record).encode())
        if record_size > budget:
            record = [record[0], record[1], "n", None, record[4]]
            record_size = len(_dumps(record).encode())
        if batch and size + record_size > budget:
            envelopes.append(head + _dumps([epoch, batch]))
            batch, size = [], 0
        batch.append(record)
        size += record_size + 1
    envelopes.append(head + _dumps([epoch, batch]))
    return envelopes


def decode(channel: str, text: str | bytes, log_id: str) -> list[Event]:
    """Decode an envelope of log ``log_id`` into events.

    Notices carry :data:`NOTICE` as their message.

    Raises:
        NotAnEnvelope: ``text`` is not an envelope of this version.
        OtherLog: ``text`` is an envelope of another log.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode()
        if not text.startswith(PREFIX):
            raise NotAnEnvelope("not a broadcast_history envelope")
        end = text.find(":", len(PREFIX))
        if end < 0:
            raise NotAnEnvelope("an envelope without a log id")
        origin = text[len(PREFIX) : end]
        if origin != log_id:
            raise OtherLog(origin)
        body = text.find(":", end + 1)
        if body < 0:
            raise NotAnEnvelope("an envelope without a sender")
        epoch, records = json.loads(text[body + 1 :])
        return list(_events(channel, epoch, records))
    except (NotAnEnvelope, OtherLog):
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        # Anyone on the transport can write text that starts like an envelope: none
        # of it may escape as another error than NotAnEnvelope.
        raise NotAnEnvelope(f"a malformed envelope: {exc}") from exc


_MAX_INT: Final = 2**63 - 1


def _events(channel: str, epoch: int, records: Iterable[list[Any]]) -> Iterable[Event]:
    _number(epoch)
    for offset, micros, kind, payload, key in records:
        _number(offset)
        _number(micros)
        if key is not None and not isinstance(key, str):
            raise TypeError("a key that is not text")
        message: Any
        if kind == "s" and isinstance(payload, str):
            message = payload
        elif kind == "b" and isinstance(payload, str):
            message = base64.b64decode(payload, validate=True)
        elif kind == "n":
            message = NOTICE
        else:
            raise ValueError(f"a record of unknown kind {kind!r}")
        yield stored_event(channel, message, offset, from_micros(micros), epoch, key)


def _number(value: object) -> None:
    # The numbers the log hands out: JSON integers within 0..2^63-1 (not bools).
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise ValueError(f"{value!r} is not an offset, epoch or time")
