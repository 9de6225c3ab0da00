"""A :class:`Feed` over a WebSocket: JSON text frames both ways.

Server to client::

    {"type": "start", "id": "<epoch>:<offset>", "epoch", "offset"}    first: where it
                                     starts (none when a reset comes first, or while a
                                     `since` time is later than every event)
    {"type": "message", "id": "<epoch>:<offset>", "channel", "offset", "epoch",
     "timestamp", "data", "encoding": "text" | "base64"}
    {"type": "reset", "id": "<epoch>:<head>", "channel", "reason", "epoch", "head", "detail"}
    {"type": "ping"}                                   after `keepalive` s without a frame
                                     (with `?pings=1`: {"type": "ping", "keepalive": s},
                                     and one first of all)
    {"type": "ack", "id": "<epoch>:<offset>", ...}     a publish was stored
    {"type": "error", "detail": "..."}                 a client frame was refused

Client to server (when publishing is enabled)::

    {"type": "publish", "data": "...", "key": "optional", "encoding": "text" | "base64"}

Client frames are handled one at a time, in order, so acks and errors come back in
the order of the frames they answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import starlette.websockets
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._errors import BroadcastError, InvalidArgument, InvalidMessage, LogUnavailable, NotConnected
from .._event import Event
from ._feed import Feed, Reset
from ._publish import event_info
from ._streams import OpenStreams, Refusal, answered, last_write, set_done, unless_stopped
from ._unavailable import unavailable

logger = logging.getLogger("broadcast_history.web")

#: Publishes a client's message (``data`` as str or bytes, ``key``) on the channel.
Publisher = Callable[[WebSocket, "str | bytes", "str | None"], Awaitable[Event]]

# Close codes: 1008 policy violation (refused by authorize); 4400 a bad request
# (channel name, start position), like HTTP 400; 1013 try again later (no log).
FORBIDDEN = 1008
BAD_REQUEST = 4400
TRY_LATER = 1013

# Starlette 1.x raises WebSocketDisconnected (a RuntimeError) for a send after the
# connection closed; earlier versions have no such class.
_DISCONNECTED: type[BaseException] | None = getattr(
    starlette.websockets, "WebSocketDisconnected", None
)
#: Messages of replayed events sent between two turns of the event loop (see
#: WebSocketSession._pump); asyncio warns from the sixth write to a closed socket on.
FRAMES_PER_TURN = 4
#: Longest wait, once a stream ends, for the answer to a client's frame under way. A
#: publish has its own bounds (the log's, 30 s and more for a big message); an
#: ``authorize`` that hangs has none, and held the socket (and a stopping server).
ANSWER_WAIT = 60.0


class _FrameFailed(Exception):
    """A client's frame failed on our side (its cause): not the client leaving."""


#: What a send or receive raises once the client has gone.
CLIENT_GONE: tuple[type[BaseException], ...] = (
    OSError,
    WebSocketDisconnect,
    *([_DISCONNECTED] if _DISCONNECTED else []),
)


def close_reason(detail: str) -> str:
    """``detail`` cut to fit a close frame's reason (at most 123 bytes)."""
    return detail.encode()[:120].decode(errors="ignore")


def message_json(event: Event) -> dict[str, Any]:
    """The ``message`` frame of an event."""
    message = event.message
    if isinstance(message, str):
        data, encoding = message, "text"
    else:
        data, encoding = base64.b64encode(message).decode("ascii"), "base64"
    return {"type": "message", **event_info(event), "data": data, "encoding": encoding}


def reset_json(reset: Reset) -> dict[str, Any]:
    """The ``reset`` frame."""
    return {
        "type": "reset",
        "id": reset.id,
        "channel": reset.channel,
        **reset.json(),
        "detail": reset.detail,
    }


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_publish(text: str) -> tuple[str | bytes, str | None]:
    """The message and key of a client's publish frame.

    Raises:
        InvalidArgument: Not a publish frame, or a malformed one.
    """
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        raise InvalidArgument("frames must be JSON objects") from None
    if not isinstance(frame, dict) or frame.get("type") != "publish":
        raise InvalidArgument('expected {"type": "publish", "data": ...}')
    data, key, encoding = frame.get("data"), frame.get("key"), frame.get("encoding", "text")
    if not isinstance(data, str):
        raise InvalidMessage("data must be a string (base64 with encoding: base64)")
    if encoding == "base64":
        try:
            return base64.b64decode(data, validate=True), key
        except (binascii.Error, ValueError):
            raise InvalidMessage("data is not valid base64") from None
    if encoding != "text":
        raise InvalidArgument('encoding must be "text" or "base64"')
    return data, key


@dataclass(eq=False)
class WebSocketSession:
    """Run one accepted WebSocket: the feed out, client frames in, pings when idle.

    Attributes:
        websocket: The accepted WebSocket.
        feed: The entered feed.
        keepalive: Seconds without a frame after which a ``ping`` frame is sent.
        streams: The app's open streams, which a stopping server ends.
        publisher: Publishes a client's message; ``None``: publishing is disabled.
        max_frame: Largest client frame accepted, in characters.
        pings: Say ``keepalive`` in each ping, and ping at once: a client that
            watches for silence (``client.js``) knows how long to wait.
        refusal: Returns once ``authorize``, asked again, refuses the stream: the
            socket is closed with 1008 and the reason.
    """

    websocket: WebSocket
    feed: Feed
    keepalive: float
    streams: OpenStreams
    publisher: Publisher | None
    max_frame: int
    pings: bool = False
    refusal: Refusal | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _last_write: float = field(default=0.0, init=False)

    async def _write(self, value: dict[str, Any]) -> None:
        message = {"type": "websocket.send", "text": _dumps(value)}
        async with self._lock:
            try:
                await self.websocket.send(message)
            except RuntimeError as exc:
                # uvicorn's websockets implementation, once the client went away:
                # "Unexpected ASGI message 'websocket.send', after sending
                # 'websocket.close'". The client left; nothing failed here.
                raise WebSocketDisconnect(1006) from exc
        self._last_write = asyncio.get_running_loop().time()

    async def run(self) -> None:
        """Until the client leaves, the feed ends, ``authorize`` refuses or the server
        stops."""
        self._last_write = asyncio.get_running_loop().time()
        with self.streams.open() as stop:
            pump, talk, revoked = await self._run(stop)
            if revoked is not None and revoked.done() and not revoked.cancelled():
                failed = None if talk.cancelled() else talk.exception()
                if isinstance(failed, _FrameFailed):
                    # A frame of the client failed as the recheck ended the stream:
                    # the recheck closes the socket, but that failure is ours to tell.
                    logger.warning(
                        "WebSocket stream of %r: a client's frame failed as the stream "
                        "ended on authorize's recheck: %r",
                        self.feed.channel,
                        failed.__cause__,
                        exc_info=failed.__cause__,
                    )
                await self._refuse(revoked)
            else:
                await self._end(pump, talk)

    async def _run(
        self, stop: asyncio.Future[None]
    ) -> tuple[asyncio.Future[None], asyncio.Future[bool], asyncio.Future[str] | None]:
        """Run the feed, the client's frames and the refusal until one ends.

        The client's side is never cancelled by the others: it is told to end, as by a
        stopping server, and a publish under way is answered first. Cancelled, its
        event would be stored and never acknowledged, and a client retrying without a
        key would store it twice.
        """
        ending = asyncio.get_running_loop().create_future()
        stop.add_done_callback(lambda _: set_done(ending))
        talk = asyncio.ensure_future(self._talk(ending))
        pump = asyncio.ensure_future(self._pump())
        revoked = None if self.refusal is None else asyncio.ensure_future(self.refusal())
        others: list[asyncio.Future[Any]] = [pump] if revoked is None else [pump, revoked]
        try:
            await asyncio.wait([talk, *others], return_when=asyncio.FIRST_COMPLETED)
            if not talk.done():
                for task in others:
                    task.cancel()  # not one frame more (for a refusal: at once)
                set_done(ending)
                await asyncio.wait([talk], timeout=ANSWER_WAIT)
                if not talk.done():
                    logger.warning(
                        "WebSocket stream of %r: a client's frame was still unanswered "
                        "%.3g s after the stream ended; given up",
                        self.feed.channel,
                        ANSWER_WAIT,
                    )
        finally:
            for each in (talk, *others):
                each.cancel()
            await asyncio.gather(talk, *others, return_exceptions=True)
        return pump, talk, revoked

    async def _refuse(self, revoked: asyncio.Future[str]) -> None:
        """Close the socket as ``authorize``, asked again, said: 1008 with its reason;
        1013 "try again later" for its ``HTTPException`` of another status (503: it
        could not tell), 1011 when it failed."""
        error = revoked.exception()
        if isinstance(error, HTTPException):
            code, reason = TRY_LATER, close_reason(str(error.detail))
        else:
            code = FORBIDDEN if error is None else 1011
            reason = "" if error is not None else close_reason(revoked.result())
        with suppress(OSError, RuntimeError, WebSocketDisconnect):
            await last_write(self.websocket.close(code, reason))
        if error is not None:
            logger.warning(
                "WebSocket stream of %r ended: authorize failed: %r", self.feed.channel, error
            )
            if not isinstance(error, HTTPException):
                raise error

    async def _end(self, pump: asyncio.Future[None], talk: asyncio.Future[bool]) -> None:
        """Close the socket as the ended tasks say (nothing if the client left)."""
        gone = not talk.cancelled() and talk.exception() is None
        gone = gone and not talk.result()
        for task in (pump, talk):
            if task.cancelled():
                continue
            error = task.exception()
            if isinstance(error, _FrameFailed) and error.__cause__ is not None:
                error = error.__cause__
            elif isinstance(error, CLIENT_GONE):
                gone = True
                continue
            if error is not None:
                logger.warning("WebSocket stream of %r ended: %r", self.feed.channel, error)
                if not isinstance(error, BroadcastError):
                    # A failure of ours (authorize raising on a publish frame): say
                    # so with 1011 "internal error" rather than drop the connection.
                    with suppress(OSError, RuntimeError, WebSocketDisconnect):
                        await last_write(self.websocket.close(1011))
                    raise error
        if not gone:
            # 1001 "going away": the feed ended or the server stops; clients come back.
            with suppress(OSError, RuntimeError, WebSocketDisconnect):
                await last_write(self.websocket.close(1001))

    def _ping(self) -> dict[str, Any]:
        return {"type": "ping", "keepalive": self.keepalive} if self.pings else {"type": "ping"}

    async def _pump(self) -> None:
        feed = self.feed
        if self.pings:
            await self._write(self._ping())
        start = feed.start()
        if start is not None:
            await self._write({"type": "start", **start})
        async for item in feed:
            await self._write(message_json(item) if isinstance(item, Event) else reset_json(item))
            # Replayed events in hand are sent without waiting: a loop turn every few
            # lets a client gone meanwhile be noticed before asyncio warns about each
            # frame written to its closed socket (it does from the sixth on).
            more = feed.take_read(FRAMES_PER_TURN - 1)
            if more:
                for event in more:
                    await self._write(message_json(event))
                await asyncio.sleep(0)

    async def _talk(self, stop: asyncio.Future[None]) -> bool:
        """Answer client frames and ping; ``False`` when the client left, ``True`` on
        ``stop``."""
        loop = asyncio.get_running_loop()
        receive = self.websocket.receive
        receiving = asyncio.ensure_future(receive())
        try:
            while True:
                wait = self._last_write + self.keepalive - loop.time()
                if wait <= 0:
                    if not await unless_stopped(stop, self._write(self._ping())):
                        return True
                    continue
                await asyncio.wait(
                    (receiving, stop), timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if stop.done():
                    return True
                if not receiving.done():
                    continue
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    return False
                if not await answered(stop, self._write(await self._answer(message))):
                    return True
                receiving = asyncio.ensure_future(receive())
        finally:
            receiving.cancel()

    async def _answer(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to a client frame, its publish done: a stopping server still
        lets it finish (cancelled, it would be stored and never acknowledged)."""
        text = message.get("text")
        try:
            if self.publisher is None:
                raise InvalidArgument("publishing is not enabled on this stream")
            if text is None:
                raise InvalidArgument("send JSON text frames")
            if len(text) > self.max_frame:
                raise InvalidArgument(f"frames are limited to {self.max_frame} characters")
            data, key = parse_publish(text)
            try:
                event = await self.publisher(self.websocket, data, key)
            except BroadcastError:
                raise
            except Exception as exc:
                # authorize (asked for the publish) failed: ours to tell, whatever its
                # type; a TimeoutError or ConnectionRefusedError is an OSError, which
                # from the socket means that the client left.
                raise _FrameFailed() from exc
        except (LogUnavailable, NotConnected) as exc:
            return {"type": "error", "detail": unavailable(exc)}
        except BroadcastError as exc:  # refused or invalid
            return {"type": "error", "detail": str(exc)}
        return {"type": "ack", **event_info(event)}
