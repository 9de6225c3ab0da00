"""The HTTP routes of durable consumers: list them, set or forget a position."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Response

from .._errors import InvalidArgument
from .._validation import MAX_IDLE, check_channel
from ._paths import channel_from_path, consumer_from_path
from ._query import HistoryAdmin
from ._schemas import ConsumerList, ConsumerOut, ErrorOut, IdleDeletedOut, PositionIn

# Module level: FastAPI resolves the (string) annotations of endpoints in this namespace.
Channel = Annotated[str, Depends(channel_from_path)]
Name = Annotated[str, Depends(consumer_from_path)]
_BUSY: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "A running process holds the consumer"},
}


def _cursor(after: str | None) -> tuple[str, str] | None:
    """The (channel, name) of a ``next_cursor``: a JSON pair of strings."""
    if after is None:
        return None
    try:
        pair = json.loads(after)
    except (ValueError, RecursionError):  # ("[" nested a thousand times deep)
        pair = None
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        raise InvalidArgument("after must be the next_cursor of a page of consumers")
    return pair[0], pair[1]


def add_consumer_routes(app: FastAPI, admin: HistoryAdmin) -> None:
    """Add the consumer routes; before the channel routes, whose ``{channel:path}``
    would take ``.../consumers/{name}`` for a channel name."""

    @app.get("/consumers", tags=["consumers"])
    async def list_consumers(
        channel: Annotated[
            str | None, Query(max_length=255, description="Only this channel's consumers")
        ] = None,
        after: Annotated[
            str | None, Query(max_length=1100, description="Cursor: `next_cursor` of a page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    ) -> ConsumerList:
        """Durable consumers with their position, lag behind the head and holder, in
        channel and name order, a page at a time."""
        if channel is not None:
            check_channel(channel)
        found = await admin.consumers(channel, after=_cursor(after), limit=limit + 1)
        more = len(found) > limit
        found = found[:limit]
        cursor = (
            json.dumps([found[-1].channel, found[-1].name], ensure_ascii=False) if more else None
        )
        return ConsumerList(consumers=[ConsumerOut.of(info) for info in found], next_cursor=cursor)

    @app.delete("/consumers", tags=["consumers"])
    async def delete_idle_consumers(
        idle_for: Annotated[
            float,
            Query(
                ge=1e-6,
                le=MAX_IDLE.total_seconds(),
                description="Seconds without a commit or a holder",
            ),
        ],
        channel: Annotated[
            str | None, Query(max_length=255, description="Only this channel's consumers")
        ] = None,
    ) -> IdleDeletedOut:
        """Forget the consumers (of `channel`, or all) that nobody holds and that
        nobody held nor committed to for `idle_for` seconds. A worker that comes back after
        that starts from its `since`/`history` again."""
        if channel is not None:
            check_channel(channel)
        idle = timedelta(seconds=idle_for)
        return IdleDeletedOut(deleted=await admin.delete_idle_consumers(idle, channel=channel))

    @app.put(
        "/channels/{channel:path}/consumers/{name}",
        tags=["consumers"],
        responses={
            409: {
                "model": ErrorOut,
                "description": "A running process holds the consumer, or the position is "
                "beyond the head or trimmed",
            }
        },
    )
    async def set_consumer(channel: Channel, name: Name, body: PositionIn) -> ConsumerOut:
        """Set a consumer's position (created if needed): its next holder starts after
        it. 409 while a process holds the consumer, or for a position beyond the head
        or trimmed."""
        return ConsumerOut.of(await admin.set_consumer(channel, name, body.position))

    @app.delete(
        "/channels/{channel:path}/consumers/{name}",
        status_code=204,
        tags=["consumers"],
        responses=_BUSY,
    )
    async def delete_consumer(channel: Channel, name: Name) -> Response:
        """Forget a consumer and its position; 409 while a process holds it."""
        await admin.delete_consumer(channel, name)
        return Response(status_code=204)
