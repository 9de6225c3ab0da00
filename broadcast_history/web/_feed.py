"""What every stream face sends: events from a position, then live, with resets said.

A :class:`Feed` is one subscription seen from a client that cannot be handed an
exception: a browser, a service in another language, a terminal. A start position
the log cannot serve (the channel was reset, trimmed past it, or the position is
beyond the head) becomes a :class:`Reset` item, and the feed goes on from the
channel's current head, so nothing is skipped without the client being told. The
same happens when the channel is reset or trimmed under a subscriber that is still
catching up. The SSE and WebSocket endpoints, the admin stream, the chat demo and the
CLI ``tail`` all read a feed; only their framing differs.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._broadcast import Broadcast
from .._errors import PositionError
from .._event import Event
from .._parse import Position, format_event_id

if TYPE_CHECKING:
    from typing_extensions import Self

    from .. import Subscriber

logger = logging.getLogger("broadcast_history.web")

#: How often a reset is retried when the channel is reset again while it is reopened.
_REOPEN_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Reset:
    """A position that could not be served; the feed continues after ``head``.

    Attributes:
        channel: The channel.
        reason: The error class: ``"StreamReset"``, ``"HistoryTruncated"`` or
            ``"OffsetOutOfRange"``.
        epoch: The channel's current epoch (``None`` if it has no history).
        head: Its last offset: the feed continues with ``head + 1``.
        detail: The error's message, for people.
    """

    channel: str
    reason: str
    epoch: int | None
    head: int
    detail: str = ""

    @property
    def id(self) -> str:
        """The position the feed continues from, as an event id.

        A client that stores it resumes right after the reset. A channel with no
        history has no epoch yet: ``"0"`` (a bare offset) then means "from its first
        event", whatever epoch it gets.
        """
        return "0" if self.epoch is None else format_event_id(self.epoch, self.head)

    def json(self) -> dict[str, Any]:
        """The ``{"reason", "epoch", "head"}`` object the streams send."""
        return {"reason": self.reason, "epoch": self.epoch, "head": self.head}


class Feed:
    """Iterate events of ``channel`` (and :class:`Reset` items) from ``position``.

    Use it as an async context manager: entering subscribes (so whatever is
    published after ``__aenter__`` returns is delivered), leaving unsubscribes.

    Args:
        broadcast: A connected broadcast.
        channel: The channel.
        position: Where to start (a :class:`Position`: ``since``, ``history`` or
            ``epoch`` as ``Broadcast.subscribe`` takes them); the default is live only.

    Raises:
        InvalidArgument: Bad channel name (on entering).
        NotConnected: The broadcast is not connected (on entering).
        LogUnavailable: The log could not be read.
    """

    def __init__(self, broadcast: Broadcast, channel: str, position: Position | None = None):
        self.broadcast = broadcast
        self.channel = channel
        self.position = position or Position()
        self._context: AbstractAsyncContextManager[Subscriber] | None = None
        self._subscriber: Subscriber | None = None
        self._resets: deque[Reset] = deque()

    @property
    def live(self) -> bool:
        """Whether the feed has caught up with the log."""
        return self._subscriber is not None and self._subscriber.live

    def start(self) -> dict[str, Any] | None:
        """Where the entered feed starts: ``{"id", "epoch", "offset"}``, the first
        event to come being ``offset + 1``; ``None`` when a :class:`Reset` comes
        first (it says where the feed goes on), or while the start is a time no
        event has reached yet.

        Streams send it first: a client that has seen no event yet (started live on
        a quiet channel) resumes from it after a reconnect, instead of from the
        head at that time, which skipped what was published meanwhile. A channel
        with no history has id ``"0"``: from its first event, whatever its epoch.
        """
        subscriber = self._subscriber
        # A start at a time later than the newest event is no offset yet: resuming
        # after the head would deliver the events stamped before that time.
        if subscriber is None or self._resets or subscriber.not_before is not None:
            return None
        epoch, offset = subscriber.epoch, subscriber.position
        start_id = "0" if epoch is None else format_event_id(epoch, offset)
        return {"id": start_id, "epoch": epoch, "offset": offset}

    async def __aenter__(self) -> Self:
        position = self.position
        try:
            await self._enter(position.since, position.history, position.epoch)
        except PositionError as exc:
            await self._reopen(exc)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._leave()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event | Reset:
        if self._resets:
            return self._resets.popleft()
        subscriber = self._subscriber
        if subscriber is None:
            raise StopAsyncIteration
        try:
            return await subscriber.__anext__()
        except PositionError as exc:
            # Reset or trimmed under a subscriber still catching up: say so, go on.
            await self._leave()
            await self._reopen(exc)
            return self._resets.popleft()

    def take_read(self, limit: int, max_bytes: int | None = None) -> list[Event]:
        """Up to ``limit`` next events already read from the log (messages of at most
        ``max_bytes`` together, if given), taken without waiting (none if a
        :class:`Reset` comes first); iteration goes on after them."""
        if self._resets or self._subscriber is None:
            return []
        return self._subscriber.take_read(limit, max_bytes)

    # -- subscriptions -----------------------------------------------------------------

    async def _enter(self, since: Any, history: int | None, epoch: int | None) -> None:
        context = self.broadcast.subscribe(self.channel, since=since, history=history, epoch=epoch)
        self._subscriber = await context.__aenter__()
        self._context = context

    async def _leave(self) -> None:
        context, self._context, self._subscriber = self._context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)

    async def _reopen(self, error: PositionError) -> None:
        """Subscribe again from the channel's head, and queue the :class:`Reset`."""
        for _ in range(_REOPEN_ATTEMPTS):
            info = await self.broadcast.log.channel(self.channel)
            epoch, head = (info.epoch, info.last_offset) if info is not None else (None, 0)
            try:
                await self._enter(head, None, epoch)
            except PositionError as again:  # reset once more meanwhile: look again
                error = again
                continue
            reset = Reset(self.channel, type(error).__name__, epoch, head, str(error))
            logger.info("channel %r: %s; continuing from %s", self.channel, error, reset.id)
            self._resets.append(reset)
            return
        raise error
