"""Reading commands: ``channels``, ``events``, ``event``, ``stats``, ``tail``."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from .._errors import InvalidArgument
from .._event import Event
from .._parse import parse_position
from ..admin import event_json
from ..admin._query import MAX_PAGE_BYTES
from ..log import ChannelInfo
from ..web import Feed, Reset
from ._app import (
    app,
    console,
    err_console,
    fail,
    flush,
    open_admin,
    open_broadcast,
    parse_time,
    print_table,
    run,
)
from ._options import DEFAULT_LOG, DEFAULT_URL, JsonOption, LogOption, UrlOption


def _time(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(sep=" ", timespec="milliseconds")


def _stats_json(stats: ChannelInfo) -> dict[str, Any]:
    # The shape of the HTTP API's channel objects. Imported here: the HTTP models
    # bring pydantic and FastAPI, a quarter of every other command's start.
    from ..admin._schemas import ChannelOut

    return ChannelOut.of(stats).model_dump(mode="json")


def _channel_row(c: ChannelInfo) -> list[str]:
    offsets = f"{c.first_offset}..{c.last_offset}"
    times = [_time(c.first_timestamp), _time(c.last_timestamp)]
    return [escape(c.name), str(c.epoch), offsets, str(c.count), *times]


def _show(
    as_json: bool,
    objects: Iterable[dict[str, Any]],
    table: Table,
    rows: Iterable[Sequence[str]],
    more: str | None,
) -> None:
    """A page as JSON lines or as a table, then how to get the next page."""
    if as_json:
        for value in objects:
            _json_line(value)
    else:
        for row in rows:
            table.add_row(*row)
        print_table(table)
    if more is not None:
        err_console.print(f"more: {more}")


def _next_page(cursor: str, *kept: tuple[str, object]) -> str:
    """The options for the next page: the cursor, then the filters given, to repeat."""
    options = [cursor]
    for flag, value in kept:
        if value is True:
            options.append(flag)
        elif value is not None and value is not False:
            options.append(f"{flag} {shlex.quote(str(value))}")
    return escape(" ".join(options))


# Messages are anyone's text: their control characters must not reach the terminal,
# where escape sequences move the cursor, erase lines (an earlier reset, say), set the
# title or write the clipboard. C0 controls show as their Unicode pictures (ESC as ␛),
# DEL and C1 controls and the bidirectional overrides (which reorder what follows) as
# escapes.
_C1 = range(0x7F, 0xA0)  # with DEL
_BIDI = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_VISIBLE: dict[int, int | str] = {code: 0x2400 + code for code in range(0x20)}
_VISIBLE[ord("\n")] = ord("⏎")
_VISIBLE |= {code: f"\\x{code:02x}" for code in _C1} | {code: f"\\u{code:04x}" for code in _BIDI}
# In JSON, C0 controls are escaped already; these are not.
_JSON_UNSAFE = {code: f"\\u{code:04x}" for code in (*_C1, *_BIDI)}


def _preview(event: Event, width: int = 60) -> str:
    message: str | bytes = event.message
    if isinstance(message, bytes):
        return f"<{len(message)} bytes: {message[:16].hex(' ')}{'…' if len(message) > 16 else ''}>"
    text = message[: width * 4].translate(_VISIBLE)
    return text if len(text) <= width else text[: width - 1] + "…"


def _json_line(value: dict[str, Any]) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False).translate(_JSON_UNSAFE))


@app.command()
def channels(
    prefix: Annotated[str | None, typer.Option(help="Only channels starting with it.")] = None,
    after: Annotated[str | None, typer.Option(help="Cursor: channels after this name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Page size.")] = 100,
    as_json: JsonOption = False,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """List channels with their stats."""

    async def go() -> None:
        async with open_admin(log) as admin:
            page = await admin.channels(prefix=prefix, after=after, limit=limit)
        cursor = page.next_cursor
        found = page.channels
        _show(
            as_json,
            (_stats_json(c) for c in found),
            Table("Channel", "Epoch", "Offsets", "Count", "First event", "Last event"),
            (_channel_row(c) for c in found),
            None
            if cursor is None
            else _next_page(
                f"--after {shlex.quote(cursor)}", ("--prefix", prefix), ("--limit", limit)
            ),
        )

    run(go())


@app.command()
def events(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    after: Annotated[int | None, typer.Option(min=0, help="Offsets greater than this.")] = None,
    before: Annotated[int | None, typer.Option(min=0, help="Offsets smaller than this.")] = None,
    since: Annotated[str | None, typer.Option(help="At or after this ISO 8601 time.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this ISO 8601 time.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Page size.")] = 100,
    desc: Annotated[bool, typer.Option("--desc", help="Newest first.")] = False,
    as_json: JsonOption = False,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Show a page of a channel's stored events (filters by offset and time)."""
    start, end = parse_time(since, "--since"), parse_time(until, "--until")

    async def go() -> None:
        async with open_admin(log) as admin:
            way: Literal["asc", "desc"] = "desc" if desc else "asc"
            page = await admin.events(
                channel,
                after=after,
                before=before,
                since=start,
                until=end,
                limit=limit,
                order=way,
                max_bytes=MAX_PAGE_BYTES,
            )
        cursor = page.next_cursor
        _show(
            as_json,
            (event_json(e) for e in page.events),
            Table("Offset", "Time", "Key", "Message", title=escape(channel.translate(_VISIBLE))),
            (
                [
                    str(e.offset),
                    _time(e.timestamp),
                    escape((e.key or "").translate(_VISIBLE)),
                    escape(_preview(e)),
                ]
                for e in page.events
            ),
            None
            if cursor is None
            else _next_page(
                f"--before {cursor}" if desc else f"--after {cursor}",
                # The bound on the other side stays; the cursor replaces this side's.
                ("--after", after if desc else None),
                ("--before", None if desc else before),
                ("--since", since),
                ("--until", until),
                ("--limit", limit),
                ("--desc", desc),
            ),
        )

    run(go())


@app.command()
def event(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    offset: Annotated[int, typer.Argument(min=0, help="The event's offset.")],
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Print one stored event as JSON."""

    async def go() -> None:
        async with open_admin(log) as admin:
            found = await admin.event(channel, offset)
        _json_line(event_json(found))

    run(go())


@app.command()
def stats(log: LogOption = DEFAULT_LOG, as_json: JsonOption = False) -> None:
    """Totals over every channel: events stored, events trimmed, oldest and newest."""

    async def go() -> None:
        async with open_admin(log) as admin:
            totals = await admin.retention_stats()
        values = {
            "channels": totals.channels,
            "events": totals.events,
            "trimmed": totals.trimmed,
            "oldest_timestamp": _time(totals.oldest_timestamp) or None,
            "newest_timestamp": _time(totals.newest_timestamp) or None,
        }
        if as_json:
            _json_line(values)
        else:
            for name, value in values.items():
                console.print(f"{name:>16}: {value if value is not None else '-'}")

    run(go())


def _reset(reset: Reset, as_json: bool) -> None:
    if as_json:
        _json_line({"type": "reset", "id": reset.id, "channel": reset.channel, **reset.json()})
    else:
        err_console.print(
            f"[yellow]reset ({reset.reason}): {escape(reset.detail)}; continuing after "
            f"offset {reset.head}[/]"
        )
    flush()


@app.command()
def tail(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    since: Annotated[
        str | None, typer.Option(help="Start after this offset, or at this ISO 8601 time.")
    ] = None,
    history: Annotated[
        int | None, typer.Option(min=0, help="Start with the last N events.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        typer.Option(help="Start after this event id (EPOCH:OFFSET), as a stream would."),
    ] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="Exit after N events (default: until Ctrl-C).")
    ] = None,
    as_json: JsonOption = False,
    log: LogOption = DEFAULT_LOG,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print a channel's events: history from --since/--history, then live, until Ctrl-C.

    Works across processes even over memory://: events published by another process
    into the same log are picked up from the log within a fraction of a second. A
    position that cannot be served (trimmed, reset, beyond the head) is said (on
    stderr, or as a {"type": "reset"} line with --json) and the tail goes on from
    the channel's head, as the streaming endpoints do.
    """
    try:
        position = parse_position(
            last_event_id=last_event_id,
            since=since,
            history=history,
        )
    except InvalidArgument as exc:
        fail(str(exc), 2)

    seen = 0

    async def go() -> None:
        # A short idle check: over memory:// the log is the only way in from
        # another process, so it is polled often enough to feel live.
        async with (
            open_broadcast(url, log, idle_check=0.2) as broadcast,
            Feed(broadcast, channel, position) as feed,
        ):
            err_console.print(f"tailing {escape(repr(channel))} (Ctrl-C to stop)")
            nonlocal seen
            async for item in feed:
                if isinstance(item, Reset):
                    _reset(item, as_json)
                    continue
                if as_json:
                    _json_line(event_json(item))
                else:
                    console.print(
                        f"[dim]{_time(item.timestamp)}[/] [bold]#{item.offset}[/] "
                        f"{escape(_preview(item, 200))}",
                        soft_wrap=True,
                    )
                flush()
                seen += 1
                if count is not None and seen >= count:
                    return

    # Ctrl-C is how tail is meant to end; with --count, before the count was reached
    # it is an interruption (130, as a shell reports one): a script got fewer events.
    try:
        run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise typer.Exit(130 if count is not None and seen < count else 0) from None
