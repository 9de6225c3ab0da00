"""The wire: committed events onto the live transport, and back off it.

One place owns both directions, so neither the appender (which commits) nor the
subscribers (which order and de-duplicate) know how events travel: sending groups
events by channel and encodes envelopes (or hands the objects over, in process);
receiving decodes them and sets aside what is not for this log.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Container, Sequence
from typing import Any, NamedTuple

from . import _envelope
from ._errors import InvalidArgument
from ._event import Event
from .backends import BroadcastBackend
from .log import EventLog

logger = logging.getLogger("broadcast_history")
# Channels and foreign logs already reported; forgotten past this many.
_MAX_REPORTED = 10_000


_NEEDS_SHARED_LOG = (
    "{url} reaches other processes, so they must share one event log: pass "
    "log='postgresql+asyncpg://...' (shared by every host) or "
    "log='sqlite+aiosqlite:///events.db' (processes on one host). With no log= (or an "
    "in-memory one), each process would keep a private log with its own offsets and "
    "epochs, and subscribers would miss the other processes' messages."
)


def require_shared_log(backend: BroadcastBackend, url: str | None) -> None:
    """Refuse a private log on a transport that reaches other processes.

    Offsets and epochs are the log's numbering: processes on one transport with logs
    of their own would number the same channel twice.

    Raises:
        InvalidArgument: ``backend`` says it crosses processes.
    """
    if getattr(backend, "crosses_processes", False):
        raise InvalidArgument(_NEEDS_SHARED_LOG.format(url=url or type(backend).__name__))


class Objects(NamedTuple):
    """Events handed to an in-process transport, with the log and broadcast they
    come from (a broadcast skips its own: it delivered them at commit)."""

    log_id: str
    sender: str
    events: tuple[Event, ...]


class Wire:
    """Sends committed events on ``backend`` and receives them for ``log``'s readers."""

    def __init__(self, backend: BroadcastBackend, log: EventLog) -> None:
        self.backend = backend
        self.log = log
        #: Transport messages ignored, by kind: ``"not_envelope"`` or ``"other_log"``.
        self.foreign: dict[str, int] = {"not_envelope": 0, "other_log": 0}
        # In one process the events themselves travel: nothing to encode or decode.
        self._objects = bool(getattr(backend, "carries_objects", False))
        self._reported: set[tuple[str, str | None]] = set()
        self._local: Callable[[str, Sequence[Event]], None] | None = None
        # Names this broadcast's envelopes and Objects, so their echo can be skipped
        # undecoded.
        self._sender = secrets.token_hex(4)

    @property
    def sends(self) -> bool:
        """Whether committed events go on the transport at all: not when only this
        broadcast reads it (the backend's ``private``, read at each commit)."""
        return not getattr(self.backend, "private", False)

    def deliver_locally(self, sink: Callable[[str, Sequence[Event]], None]) -> None:
        """Hand events sent from this process to ``sink`` at once, too.

        Subscribers in the sending process then need not wait for the transport's
        round trip; the copy that comes back through the transport is a duplicate
        they drop by its offset, or skip unread when it is marked as this wire's.
        """
        self._local = sink

    def hand_over(self, events: Sequence[Event]) -> None:
        """Give committed ``events`` to this process's own subscribers (see
        :meth:`deliver_locally`), without waiting for the transport."""
        local = self._local
        if local is not None:
            for channel, batch in _by_channel(events).items():
                local(channel, batch)

    async def send(self, events: Sequence[Event]) -> None:
        """Publish committed ``events`` (of any channels), in commit order per channel."""
        messages: list[tuple[str, Any]] = []
        log_id = self.log.log_id
        # Read at each send: a transport may learn its server's limit when connecting.
        limit: int | None = getattr(self.backend, "max_message_size", None)
        for channel, batch in _by_channel(events).items():
            if self._objects:
                messages.append((channel, Objects(log_id, self._sender, tuple(batch))))
            else:
                for text in _envelope.encode(batch, log_id, limit, self._sender):
                    messages.append((channel, text))
        publish_many = getattr(self.backend, "publish_many", None)
        if publish_many is not None:
            await publish_many(messages)
        else:
            # broadcaster 0.3's own backend classes have publish() only.
            for channel, message in messages:
                await self.backend.publish(channel, message)

    async def receive(self, wanted: Container[str]) -> tuple[str, Sequence[Event]]:
        """The next events of this log on a ``wanted`` channel.

        Messages of other channels are skipped before decoding; messages that are not
        envelopes, or are envelopes of another log, are counted and reported once per
        channel (and log), never delivered.
        """
        backend = self.backend
        log_id = self.log.log_id
        # Our own messages, when we delivered their events locally already.
        local = self._local is not None
        sender = self._sender
        echo = f"{_envelope.PREFIX}{log_id}:{sender}:" if local else None
        while True:
            raw = await backend.next_published()
            channel = raw.channel
            if channel not in wanted:
                continue
            message = raw.message
            if echo is not None and isinstance(message, str) and message.startswith(echo):
                continue
            if isinstance(message, Objects):
                if message.log_id != log_id:
                    self._ignore(channel, message.log_id)
                elif not (local and message.sender == sender):
                    return channel, message.events
                continue
            if not isinstance(message, str | bytes):
                self._ignore(channel, None)  # an object no broadcast sent
                continue
            try:
                return channel, _envelope.decode(channel, message, log_id)
            except _envelope.OtherLog as exc:
                self._ignore(channel, exc.log_id)
            except _envelope.NotAnEnvelope:
                self._ignore(channel, None)

    def _ignore(self, channel: str, origin: str | None) -> None:
        kind = "not_envelope" if origin is None else "other_log"
        self.foreign[kind] += 1
        if (channel, origin) in self._reported:
            return
        if len(self._reported) >= _MAX_REPORTED:
            self._reported.clear()  # bounded: a storm of names must not grow memory
        self._reported.add((channel, origin))
        if origin is None:
            logger.warning(
                "ignoring messages on %r that are not broadcast_history envelopes "
                "(another program publishing on the transport?); logged once per channel",
                channel,
            )
        else:
            logger.error(
                "ignoring events on %r from another event log (%s; this one is %s): "
                "processes sharing a transport must share one log (give each the same "
                "log= URL; a custom backend that reaches other processes should say "
                "crosses_processes = True, so that a missing log= is refused); logged "
                "once per channel and log",
                channel,
                origin,
                self.log.log_id,
            )


def _by_channel(events: Sequence[Event]) -> dict[str, list[Event]]:
    by_channel: dict[str, list[Event]] = {}
    for event in events:
        by_channel.setdefault(event.channel, []).append(event)
    return by_channel
