"""Code as an application writes it, checked by ``mypy --strict`` (scripts/check).

It is never run: it pins what the public API's types let through and what they
refuse. Each ``type: ignore`` marks an error a user must get; mypy's
``warn_unused_ignores`` (part of strict) fails the check if one stops being an error.
"""

from __future__ import annotations

from datetime import datetime, timezone

from broadcast_history import Broadcast, Event, EventLog, LogUnavailable, admin, cli, web
from broadcast_history.admin import EventPage, HistoryAdmin, ImportResult, create_app
from broadcast_history.cli import DEFAULT_LOG, app
from broadcast_history.web import Feed, Position, allow_all, create_stream_app


async def publish_and_read(broadcast: Broadcast) -> list[str | bytes]:
    event: Event = await broadcast.publish("orders", "created")
    await broadcast.publish("orders", b"\x00raw", key="k-1")
    await broadcast.publish("orders", {"id": 7})  # type: ignore[arg-type]
    offset: int = event.offset
    got: list[str | bytes] = []
    async with broadcast.subscribe("orders", since=offset - 1) as subscriber:
        async for item in subscriber:
            got.append(item.message)
            break
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    async with broadcast.subscribe("orders", since=start) as subscriber:
        got.append((await subscriber.get()).message)
    return got


async def operate(broadcast: Broadcast) -> tuple[int, int]:
    log: EventLog = broadcast.log
    admin = HistoryAdmin.of(broadcast)
    page: EventPage = await admin.events("orders", order="desc", limit=10)
    order: str = page.order
    result: ImportResult = await admin.import_jsonl([])
    try:
        info = await log.channel("orders")
    except LogUnavailable:
        return 0, 0
    assert order in ("asc", "desc")
    return (0 if info is None else info.last_offset), result.events


def apps(broadcast: Broadcast) -> object:
    stream = create_stream_app(broadcast, authorize=allow_all)
    console = create_app(broadcast, token="secret")
    feed = Feed(broadcast, "orders", Position(since=0))
    return stream, console, feed, app, DEFAULT_LOG


def misspelled() -> object:
    # The modules import some names lazily (on first use): a misspelled one is still
    # an error for the type checker.
    return (
        admin.HistoryAdmn,  # type: ignore[attr-defined]
        web.create_stream_ap,  # type: ignore[attr-defined]
        cli.mainx,  # type: ignore[attr-defined]
    )
