"""The admin HTTP API: a FastAPI app over :class:`HistoryAdmin`.

FastAPI (over Starlette) because the OpenAPI schema comes from the same type hints
that validate the parameters, so the schema cannot drift from the code, and
schemathesis can test the app against it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect

from .._broadcast import Broadcast
from .._cancel import wait_for
from .._errors import (
    BroadcastError,
    ConsumerBusy,
    InvalidArgument,
    LogUnavailable,
    MessageTooLarge,
    PositionError,
)
from .._parse import parse_since
from .._sparse import Sparse
from .._validation import check_channel
from ..web._publish import UnsupportedEncoding
from ..web._sse import check_keepalive
from ..web._streams import OpenStreams
from ._console import add_console
from ._consumer_routes import add_consumer_routes
from ._errors import ImportConflict, NotFound
from ._exporting import ExportResponse
from ._import import max_line_length, split_lines
from ._local import local_only
from ._paths import EncodedSlashes, channel_from_path
from ._query import MAX_PAGE_BYTES, HistoryAdmin
from ._streaming import add_streaming_routes

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

from .._spaced import SpacedRead
from ._schemas import (
    MAX_OFFSET,
    ChannelList,
    ChannelOut,
    ErrorOut,
    EventList,
    EventOut,
    ImportOut,
    IsoTime,
    StatsOut,
    TrimIn,
    TrimOut,
    invalid_parameter,
)

logger = logging.getLogger("broadcast_history.admin")
# A scrape every few seconds while the log is down: one line a minute says it.
_lag_failures = Sparse(logger, 60.0)

T = TypeVar("T")
#: Pages of events read and encoded at once by one app; more requests wait their turn.
#: A page is up to 8 MiB of messages and about five times that while it becomes JSON:
#: 64 requests at once took 167 MiB more on a Postgres log, and as much again per
#: each further 64 (the pool bounds the reads, not what is encoded after them).
PAGES_AT_ONCE = 4
_EVENT_LIST = TypeAdapter(EventList)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Invalid parameter"},
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorOut, "description": "Unknown channel or event"},
    503: {"model": ErrorOut, "description": "The event log cannot be reached"},
}
_STATUS: list[tuple[type[BroadcastError], int]] = [
    (NotFound, 404),
    (MessageTooLarge, 413),
    (UnsupportedEncoding, 415),
    (InvalidArgument, 400),
    (ImportConflict, 409),
    (ConsumerBusy, 409),
    (PositionError, 409),
    (LogUnavailable, 503),
]


# Module level: FastAPI resolves the (string) annotations of endpoints in this namespace.
_BEARER = HTTPBearer(auto_error=False, description="The token given to create_app")
Channel = Annotated[str, Depends(channel_from_path)]
Offset = Annotated[int | None, Query(ge=0, le=MAX_OFFSET)]


def create_app(
    broadcast: Broadcast,
    *,
    token: str | None = None,
    allow_no_token: bool = False,
    heartbeat: float = 15.0,
) -> FastAPI:
    """The admin HTTP API of ``broadcast``, as an ASGI app to mount or serve.

    The app connects ``broadcast`` at startup if it is not connected yet (and then
    disconnects it at shutdown); a host application that manages ``broadcast``
    itself can mount the app as it is.

    Args:
        broadcast: The broadcast whose log is exposed (and whose channels are streamed).
        token: Every request but the OpenAPI schema, the docs and the console's
            static files (``/ui``) needs ``Authorization: Bearer <token>``.
        allow_no_token: Serve without a token: for local use only.
        heartbeat: Seconds without traffic after which an event stream gets a
            ``: ping`` comment.

    Raises:
        InvalidArgument: No token and ``allow_no_token`` is not set, or a
            ``heartbeat`` that is not a finite number of seconds (at least 0.01).
    """
    if not token and not allow_no_token:
        raise InvalidArgument(
            "the admin API needs a token (create_app(..., token=...)); "
            "pass allow_no_token=True only for local use"
        )
    if token and (not token.isascii() or not token.isprintable() or " " in token):
        # HTTP headers carry ASCII: any other token could never be presented.
        raise InvalidArgument("the admin token must be printable ASCII without spaces")
    heartbeat = check_keepalive(heartbeat, "heartbeat")
    expected = token.encode() if token else None
    admin = HistoryAdmin.of(broadcast)
    streams = OpenStreams()

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if expected is None:
            local_only(request)  # no token: at least not the rest of the web
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time: how much of a guess matched must not show in the timing.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    app = FastAPI(
        title="broadcast_history admin",
        description="Channels and events of a broadcast_history event log.",
        lifespan=streams.lifespan(broadcast),
        dependencies=[Depends(authorize)],
        responses=_ERRORS,
    )
    _add_error_handlers(app)
    add_consumer_routes(app, admin)
    _add_routes(app, broadcast, admin, heartbeat, streams)
    add_console(app)
    app.add_middleware(EncodedSlashes)
    # What a stopping server calls to end the event streams (they never end alone).
    app.state.close_streams = streams.close_all
    app.state.stopping_streams = streams.stopping
    app.state.finish_streams = streams.finish
    return app


def _metrics_registry(broadcast: Broadcast) -> CollectorRegistry | None:
    """The broadcast's metrics registry; a private one if it exports none yet."""
    if broadcast.metrics_registry is not None:
        return broadcast.metrics_registry
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    from .._metrics import register

    return register(broadcast, CollectorRegistry(auto_describe=True))


def _streamed(media_type: str, description: str) -> dict[str, Any]:
    """Route options of a streamed response, for the OpenAPI schema."""
    content = {"content": {media_type: {}}, "description": description}
    return {"response_class": StreamingResponse, "responses": {200: content}}


def _query_value(parse: Callable[[str], T], name: str, value: str) -> T:
    """Parse a query parameter; a bad one is a 422, as FastAPI's own validation."""
    try:
        return parse(value)
    except InvalidArgument as exc:
        raise invalid_parameter("query", name, value, exc) from exc


def _add_error_handlers(app: FastAPI) -> None:
    async def handle(_request: Request, exc: Exception) -> Response:
        for kind, status in _STATUS:
            if isinstance(exc, kind):
                return JSONResponse({"detail": str(exc)}, status_code=status)
        return JSONResponse({"detail": str(exc)}, status_code=500)

    app.add_exception_handler(BroadcastError, handle)


def _add_routes(
    app: FastAPI,
    broadcast: Broadcast,
    admin: HistoryAdmin,
    heartbeat: float,
    streams: OpenStreams,
) -> None:
    # Routes with a suffix come first: `{channel:path}` would swallow it otherwise.

    @app.get("/channels", tags=["channels"])
    async def list_channels(
        prefix: Annotated[str | None, Query(max_length=255)] = None,
        after: Annotated[str | None, Query(max_length=255, description="Cursor")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ChannelList:
        """Channels in name order, with their stats."""
        page = await admin.channels(prefix=prefix, after=after, limit=limit)
        return ChannelList(
            channels=[ChannelOut.of(c) for c in page.channels], next_cursor=page.next_cursor
        )

    @app.get("/channels/{channel:path}/events/{offset}", tags=["events"])
    async def get_event(
        channel: Channel, offset: Annotated[int, Path(ge=0, le=MAX_OFFSET)]
    ) -> EventOut:
        """One stored event."""
        return EventOut.of(await admin.event(channel, offset))

    # One per event loop: a semaphore is bound to the loop that first waits on it,
    # and an app can be served again in another (a second TestClient session).
    page_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
    page_slots = weakref.WeakKeyDictionary()

    @app.get("/channels/{channel:path}/events", tags=["events"], response_model=EventList)
    async def list_events(
        channel: Channel,
        after: Offset = None,
        before: Offset = None,
        since: Annotated[
            str | None,
            Query(
                max_length=64,
                description="An offset (events after it, as `after`) or an ISO 8601 time "
                "(events at or after it), as in `/stream`",
            ),
        ] = None,
        until: Annotated[
            IsoTime | None, Query(description="An ISO 8601 time: events before it")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        order: Literal["asc", "desc"] = "asc",
    ) -> Response:
        """A page of events by offset and/or time range, oldest or newest first.

        A page holds at most `limit` events and about 8 MiB of messages (always at
        least one event): follow `next_cursor` for the rest."""
        start = None if since is None else _query_value(parse_since, "since", since)
        if isinstance(start, int):
            # Both bound the page from below: a page's next_cursor goes in `after`
            # while `since` stays as it was.
            after, start = start if after is None else max(after, start), None
        loop = asyncio.get_running_loop()
        pages = page_slots.get(loop)
        if pages is None:
            pages = page_slots[loop] = asyncio.Semaphore(PAGES_AT_ONCE)
        async with pages:
            # Encoded here, under the limit, rather than by FastAPI once this returns.
            page = await admin.events(
                channel,
                after=after,
                before=before,
                since=start,
                until=until,
                limit=limit,
                order=order,
                max_bytes=MAX_PAGE_BYTES,
            )
            body = _EVENT_LIST.dump_json(EventList.of(page))
        return Response(body, media_type="application/json")

    add_streaming_routes(app, broadcast, heartbeat, streams)

    @app.post("/channels/{channel:path}/trim", tags=["channels"])
    async def trim_channel(channel: Channel, bounds: TrimIn) -> TrimOut:
        """Remove old events of a channel: offsets below `before`, older than `before_time`."""
        removed = await admin.trim(channel, before=bounds.before, before_time=bounds.before_time)
        stats = await admin.channel(channel)
        return TrimOut(channel=channel, removed=removed, first_offset=stats.first_offset)

    @app.get(
        "/channels/{channel:path}/export",
        tags=["export"],
        **_streamed("application/x-ndjson", "JSON lines"),
    )
    async def export_channel(channel: Channel) -> StreamingResponse:
        """One channel as JSON lines (the format `POST /import` reads)."""
        return await ExportResponse.of(admin.export_jsonl([channel]))

    @app.get("/channels/{channel:path}", tags=["channels"])
    async def get_channel(channel: Channel) -> ChannelOut:
        """A channel's stats."""
        return ChannelOut.of(await admin.channel(channel))

    @app.delete("/channels/{channel:path}", status_code=204, tags=["channels"])
    async def delete_channel(channel: Channel) -> Response:
        """Delete a channel and its history; its next use starts a new epoch."""
        await admin.delete(channel)
        return Response(status_code=204)

    @app.get(
        "/export",
        tags=["export"],
        **_streamed("application/x-ndjson", "JSON lines"),
    )
    async def export_all(
        prefix: Annotated[str | None, Query(max_length=255)] = None,
    ) -> StreamingResponse:
        """Every channel (or those under `prefix`) as JSON lines."""
        if prefix:
            check_channel(prefix)  # a 400 now, not a broken stream later
        return await ExportResponse.of(admin.export_jsonl(prefix=prefix))

    @app.post(
        "/import",
        tags=["export"],
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            }
        },
        responses={409: {"model": ErrorOut, "description": "A channel already exists"}},
    )
    async def import_lines(request: Request, new_epoch: bool = False) -> ImportOut:
        """Store an export, all or nothing; 409 if one of its channels already exists.
        `new_epoch=true` gives each channel a new epoch (restoring an older backup)."""
        lines = split_lines(request.stream(), max_line_length(admin.max_message_size))
        try:
            result = await admin.import_jsonl(lines, new_epoch=new_epoch)
        except ClientDisconnect:
            # Nothing was stored; nobody reads the answer: a 400 rather than a
            # traceback in the server's log.
            raise InvalidArgument(
                "the client went away before sending the whole export; nothing was imported"
            ) from None
        return ImportOut(channels=result.channels, events=result.events)

    registry = _metrics_registry(broadcast)

    @app.get(
        "/metrics",
        tags=["metrics"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics of the broadcast (the `metrics` extra)."""
        if registry is None:
            raise HTTPException(501, "metrics need prometheus-client: the `metrics` extra")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from .. import _metrics

        collector = _metrics.collector_of(registry)
        if collector is not None:
            try:
                # consumer_lag as of this scrape, if the log answers in time: a log
                # that went silent would hold the scrape past Prometheus' timeout.
                await wait_for(collector.refresh_lags(), _metrics.SCRAPE_WAIT)
            except (BroadcastError, asyncio.TimeoutError) as exc:
                # The log is down: scrape the other metrics anyway (with the last
                # lags); an unreachable log is what an operator most needs to see.
                _lag_failures.warning("consumer lag refresh for a scrape failed: %r", exc)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    totals = SpacedRead(admin.retention_stats)

    @app.get("/stats", tags=["channels"])
    async def retention_stats() -> StatsOut:
        """Totals over every channel and the retention settings (a log of many
        channels answers the same for 20 times as long as reading them took)."""
        return StatsOut.of(await totals())
