"""The admin API's realtime routes, built on :mod:`broadcast_history.web`.

``GET /channels/{channel}/stream`` is the web module's event stream with the admin's
JSON event objects as data; ``POST /channels/{channel}/events`` publishes with the
web module's body rules. Both sit behind the admin token like every route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from .._broadcast import Broadcast
from .._errors import InvalidArgument
from .._event import Event
from .._parse import parse_position
from ..web._feed import Feed
from ..web._publish import event_info, publish_request
from ..web._sse import EventStream, json_frame
from ..web._streams import OpenStreams
from ._jsonl import event_json
from ._paths import channel_from_path
from ._schemas import MAX_OFFSET, MESSAGE_BODY, ErrorOut, PublishedOut, invalid_parameter

# Module level: FastAPI resolves the (string) annotations of endpoints in this namespace.
Channel = Annotated[str, Depends(channel_from_path)]


def _stream_frame(event: Event) -> bytes:
    """An event of ``/stream``: the JSON object of ``/events`` as its data."""
    return json_frame(event, event_json(event))


def add_streaming_routes(
    app: FastAPI, broadcast: Broadcast, heartbeat: float, streams: OpenStreams
) -> None:
    """Add ``POST /channels/{channel}/events`` and ``GET /channels/{channel}/stream``
    (before the routes without a suffix, which would take them)."""

    @app.post(
        "/channels/{channel:path}/events",
        tags=["events"],
        status_code=201,
        openapi_extra={"requestBody": {"required": True, "content": MESSAGE_BODY}},
        responses={
            413: {"model": ErrorOut, "description": "Over the message size limit"},
            415: {"model": ErrorOut, "description": "A compressed body (Content-Encoding)"},
        },
    )
    async def publish_event(
        channel: Channel,
        request: Request,
        # Read (and its length checked, in characters) by publish_request: the header
        # arrives as Latin-1, a byte a character, where keys are UTF-8.
        idempotency_key: Annotated[
            str | None, Header(description="`key=` of publish: 1-255 characters")
        ] = None,
    ) -> PublishedOut:
        """Publish the body: `text/*` and `application/json` as text, anything else as
        bytes; `Idempotency-Key` returns the event first stored with that key."""
        return PublishedOut(**event_info(await publish_request(broadcast, channel, request)))

    @app.get(
        "/channels/{channel:path}/stream",
        tags=["events"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "SSE"}},
    )
    async def stream_events(
        channel: Channel,
        since: Annotated[str | None, Query(description="Offset or ISO 8601 time")] = None,
        history: Annotated[int | None, Query(ge=0, le=MAX_OFFSET)] = None,
        last_event_id: Annotated[str | None, Header(max_length=100)] = None,
    ) -> Response:
        """Server-Sent Events: catch-up from `Last-Event-ID` (`epoch:offset`) or
        `since`, then live. A position that cannot be served is said with one `reset`
        event (`{"reason", "epoch", "head"}`), then the stream goes on from the head."""
        try:
            position = parse_position(last_event_id=last_event_id, since=since, history=history)
        except InvalidArgument as exc:  # a 422, as FastAPI's own validation
            if last_event_id:
                raise invalid_parameter("header", "last-event-id", last_event_id, exc) from exc
            raise invalid_parameter("query", "since", since, exc) from exc
        feed = Feed(broadcast, channel, position)
        return EventStream(feed, keepalive=heartbeat, streams=streams, encode=_stream_frame)
