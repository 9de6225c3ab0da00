"""The HTTP routes of durable consumers: list them, set or forget a position."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Response

from .._validation import check_channel
from ._paths import channel_from_path, consumer_from_path
from ._query import HistoryAdmin
from ._schemas import ConsumerList, ConsumerOut, ErrorOut, PositionIn

# Module level: FastAPI resolves the (string) annotations of endpoints in this namespace.
Channel = Annotated[str, Depends(channel_from_path)]
Name = Annotated[str, Depends(consumer_from_path)]
_BUSY: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "A running process holds the consumer"},
}


def add_consumer_routes(app: FastAPI, admin: HistoryAdmin) -> None:
    """Add the consumer routes; before the channel routes, whose ``{channel:path}``
    would take ``.../consumers/{name}`` for a channel name."""

    @app.get("/consumers", tags=["consumers"])
    async def list_consumers(
        channel: Annotated[
            str | None, Query(max_length=255, description="Only this channel's consumers")
        ] = None,
    ) -> ConsumerList:
        """Durable consumers with their position, lag behind the head and holder."""
        if channel is not None:
            check_channel(channel)
        found = await admin.consumers(channel)
        return ConsumerList(consumers=[ConsumerOut.of(info) for info in found])

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
