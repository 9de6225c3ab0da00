"""``create_stream_app``: the routes browsers and other languages use.

``GET /{channel}`` (Server-Sent Events), ``GET /{channel}/ws`` (WebSocket),
``POST /{channel}`` (publish, when enabled) and ``GET /client.js``.
"""

from __future__ import annotations

from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._broadcast import Broadcast
from .._errors import (
    BroadcastError,
    InvalidArgument,
    LogUnavailable,
    MessageTooLarge,
    NotConnected,
)
from .._event import Event
from .._parse import Position, parse_position
from ._auth import Authorize, Forbidden, check_authorize, require
from ._feed import Feed
from ._paths import channel_from_path
from ._publish import UnsupportedEncoding, event_info, publish_request
from ._sse import EventStream, check_keepalive
from ._streams import OpenStreams, Refusal, refused
from ._unavailable import unavailable
from ._ws import BAD_REQUEST, CLIENT_GONE, FORBIDDEN, TRY_LATER, WebSocketSession, close_reason

STATIC = Path(__file__).parent / "static"


def request_position(connection: HTTPConnection) -> Position:
    """The start position a request asks for: ``Last-Event-ID``, else the query's
    ``last_event_id``, ``since`` (an offset or an ISO time) or ``history``.

    Raises:
        InvalidArgument: A malformed or out-of-range value.
    """
    params = connection.query_params
    return parse_position(
        last_event_id=connection.headers.get("last-event-id") or params.get("last_event_id"),
        since=params.get("since"),
        history=params.get("history"),
    )


def _pings(connection: HTTPConnection) -> bool:
    """Whether the client asked for pings it can watch (``?pings=1``, as ``client.js``)."""
    return connection.query_params.get("pings") == "1"


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def refuses(status: int) -> bool:
    """Whether an ``HTTPException`` of ``authorize`` with ``status`` refuses a stream
    (a 4xx: 401, 403, 404...) or says to come back later (408, 429, a 5xx)."""
    return 400 <= status < 500 and status not in (408, 429)


def _check_recheck(recheck: Any) -> float | None:
    if recheck is None:
        return None
    if isinstance(recheck, bool) or not isinstance(recheck, (int, float)):
        raise InvalidArgument(f"recheck must be a number of seconds or None, got {recheck!r}")
    if not 0 < recheck < float("inf"):
        raise InvalidArgument(f"recheck must be positive and finite, got {recheck!r}")
    return float(recheck)


def _refusal(
    authorize: Authorize, connection: HTTPConnection, channel: str, every: float
) -> Refusal:
    """Ask ``authorize`` about an open stream every ``every`` seconds, until it refuses
    (its ``HTTPException`` 401 or 403 too: a token that expired meanwhile). Another
    status (503: it could not tell) ends the stream without refusing it: the client
    comes back, and is asked at the door."""

    async def recheck() -> None:
        try:
            await require(authorize, connection, channel, "subscribe")
        except HTTPException as exc:
            if refuses(exc.status_code):
                raise Forbidden(str(exc.detail)) from None
            raise

    return partial(refused, recheck, every)


async def _close(websocket: WebSocket, code: int, detail: str) -> None:
    """Accept, say why in an error frame, and close with ``code``."""
    with suppress(OSError, RuntimeError, WebSocketDisconnect):
        await websocket.accept()
        await websocket.send_json({"type": "error", "detail": detail})
        await websocket.close(code, close_reason(detail))


def create_stream_app(
    broadcast: Broadcast,
    *,
    authorize: Authorize,
    publish: bool = False,
    keepalive: float = 15.0,
    recheck: float | None = None,
) -> Starlette:
    """An ASGI app streaming ``broadcast``'s channels to browsers and other languages.

    Mount it in a web app (``app.mount("/events", create_stream_app(...))``) or serve
    it alone. Served alone it connects ``broadcast`` at startup if needed (and then
    disconnects it at shutdown); mounted, the host app connects it in its own
    lifespan (Starlette does not run a mounted app's lifespan).

    Routes:
        ``GET /{channel}``: Server-Sent Events from ``Last-Event-ID`` (or
        ``?last_event_id=``, ``?since=``, ``?history=``), then live.
        ``GET /{channel}/ws``: the same as WebSocket JSON frames.
        ``POST /{channel}``: publish the body (with ``publish=True``).
        ``GET /client.js``: the browser client, an ES module.

    ``app.state.close_streams()`` ends every open stream (for a server that is
    stopping; safe from a signal handler or another thread); ``await
    app.state.finish_streams(timeout)`` ends them and waits for them to be over (for
    a server's shutdown, before it closes the connections); ``with
    app.state.stopping_streams():`` around a server's whole shutdown also ends the
    streams opened meanwhile (``StreamServer`` does both).

    Args:
        broadcast: The broadcast to stream.
        authorize: ``async (connection, channel, action) -> bool``, ``action`` being
            ``"subscribe"`` or ``"publish"`` (asked for each message published).
            Anything but ``True`` answers 403, or closes a WebSocket with code 1008.
            :func:`allow_all` lets everyone in.
        publish: Accept ``POST /{channel}`` and WebSocket ``publish`` frames.
        keepalive: Seconds without traffic after which an idle stream is pinged.
        recheck: Ask ``authorize`` again every ``recheck`` seconds whether each open
            stream may go on, and end the ones it refuses (SSE: an ``event: refused``
            frame; WebSocket: close code 1008), so a revoked user or an expired token
            stops receiving. A publish under way on the WebSocket is answered first.
            Its ``HTTPException`` 401 or 403 refuses too; another status (503: it
            could not tell) ends the stream without refusing it (a WebSocket closes
            with 1013), and the client comes back. ``None`` (default): asked once, at
            the start.

    Raises:
        InvalidArgument: ``authorize`` is not callable, or ``keepalive`` or
            ``recheck`` is not positive.
    """
    authorize = check_authorize(authorize)
    keepalive = check_keepalive(keepalive)
    recheck_every = _check_recheck(recheck)

    def refusal(connection: HTTPConnection, channel: str) -> Refusal | None:
        if recheck_every is None:
            return None
        return _refusal(authorize, connection, channel, recheck_every)

    streams = OpenStreams()
    # A publish frame carries its message as JSON text: bytes as base64 (4/3 larger),
    # text escaped by the client's encoder, up to 6 times longer (``\u00e9`` for
    # ``é`` with Python's default ensure_ascii, ``\u0001`` for a control byte).
    max_frame = 6 * broadcast.max_message_size + 4096

    async def subscribe_sse(request: Request) -> Response:
        try:
            channel = channel_from_path(request)
        except InvalidArgument as exc:
            return _error(400, str(exc))
        try:
            position = request_position(request)
        except InvalidArgument as exc:
            return _error(422, str(exc))
        try:
            await require(authorize, request, channel, "subscribe")
        except Forbidden as exc:
            return _error(403, str(exc))
        return EventStream(
            Feed(broadcast, channel, position),
            keepalive=keepalive,
            streams=streams,
            pings=_pings(request),
            refusal=refusal(request, channel),
        )

    async def publish_http(request: Request) -> Response:
        try:
            channel = channel_from_path(request)
            await require(authorize, request, channel, "publish")
            event = await publish_request(broadcast, channel, request)
        except Forbidden as exc:
            return _error(403, str(exc))
        except MessageTooLarge as exc:
            return _error(413, str(exc))
        except UnsupportedEncoding as exc:
            return _error(415, str(exc))
        except InvalidArgument as exc:
            return _error(400, str(exc))
        except (LogUnavailable, NotConnected) as exc:
            return _error(503, unavailable(exc))
        return JSONResponse(event_info(event), status_code=201)

    async def subscribe_ws(websocket: WebSocket) -> None:
        try:
            channel = channel_from_path(websocket)
            position = request_position(websocket)
        except InvalidArgument as exc:
            await _close(websocket, BAD_REQUEST, str(exc))
            return
        try:
            await require(authorize, websocket, channel, "subscribe")
        except Forbidden as exc:
            await _close(websocket, FORBIDDEN, str(exc))
            return
        except HTTPException as exc:
            # As when asked again on an open stream: a 4xx refuses (1008, which
            # client.js does not ask again), 408, 429 and a 5xx say "try later" (1013).
            # Left to Starlette, the handshake was denied (1006 in a browser) and the
            # client retried for ever.
            code = FORBIDDEN if refuses(exc.status_code) else TRY_LATER
            await _close(websocket, code, str(exc.detail))
            return

        async def publisher(ws: WebSocket, message: str | bytes, key: str | None) -> Event:
            try:
                await require(authorize, ws, channel, "publish")
            except HTTPException as exc:
                # An error frame for this publish, as for a refusal (a token expired
                # meanwhile: 401), or for a 503; not the end of the socket with 1011.
                if refuses(exc.status_code):
                    raise Forbidden(str(exc.detail)) from None
                raise BroadcastError(str(exc.detail)) from None  # its words, to the client
            return await broadcast.publish(channel, message, key=key)

        feed = Feed(broadcast, channel, position)
        try:
            # Subscribed before the handshake completes: a client whose socket is
            # open receives whatever is published next.
            await feed.__aenter__()
        except (LogUnavailable, NotConnected) as exc:
            await _close(websocket, TRY_LATER, unavailable(exc))
            return
        try:
            await websocket.accept()
            session = WebSocketSession(
                websocket,
                feed,
                keepalive=keepalive,
                streams=streams,
                publisher=publisher if publish else None,
                max_frame=max_frame,
                pings=_pings(websocket),
                refusal=refusal(websocket, channel),
            )
            await session.run()
        except CLIENT_GONE:
            pass  # gone during the handshake
        finally:
            await feed.__aexit__(None, None, None)

    async def client_js(request: Request) -> Response:
        return FileResponse(
            STATIC / "client.js",
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    routes = [
        Route("/client.js", client_js, methods=["GET"]),
        Route("/{channel:path}", subscribe_sse, methods=["GET"]),
        # WebSocket routes only match WebSocket requests: GET /a/ws is the event
        # stream of channel "a/ws", a WebSocket to /a/ws the one of channel "a".
        WebSocketRoute("/{channel:path}/ws", subscribe_ws),
    ]
    if publish:
        routes.append(Route("/{channel:path}", publish_http, methods=["POST"]))
    app = Starlette(routes=routes, lifespan=streams.lifespan(broadcast))
    app.state.close_streams = streams.close_all
    app.state.stopping_streams = streams.stopping
    app.state.finish_streams = streams.finish
    app.state.streams = streams
    return app
