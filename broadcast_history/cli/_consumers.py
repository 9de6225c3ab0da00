"""Durable consumers: ``consumers [CHANNEL]``, ``consumer set``, ``consumer delete``,
``consumer prune``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .._validation import MAX_IDLE
from ..log import ConsumerInfo
from ._app import app, console, err_console, open_admin, print_table, run
from ._options import DEFAULT_LOG, JsonOption, LogOption

consumer = typer.Typer(
    help="Move or forget a durable consumer's stored position.", no_args_is_help=True
)
app.add_typer(consumer, name="consumer")

Channel = Annotated[str, typer.Argument(help="The channel.")]
Name = Annotated[str, typer.Argument(help="The consumer's name.")]


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return escape(str(value))


def _lag(info: ConsumerInfo) -> str:
    if info.lag is None:
        # No position yet, or one of an earlier epoch: resuming it raises StreamReset.
        return "-" if info.position is None else "[red]reset[/]"
    return f"[yellow]{info.lag}[/]" if info.lag else "0"


def _describe(info: ConsumerInfo) -> str:
    return (
        f"consumer {escape(repr(info.name))} of {escape(repr(info.channel))}: position "
        f"{_text(info.position)} (epoch {_text(info.epoch)}), lag {_text(info.lag)}"
    )


#: Most consumers the table shows (``--json`` streams them all).
TABLE_ROWS = 1000


@app.command("consumers")
def list_consumers(
    channel: Annotated[str | None, typer.Argument(help="Only this channel's consumers.")] = None,
    as_json: JsonOption = False,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """List durable consumers: stored position, lag behind the head, holder."""

    if as_json:
        from ..admin._schemas import ConsumerOut  # see _read._stats_json

        async def each() -> None:  # a page at a time, however many consumers
            async with open_admin(log) as admin:
                async for info in admin.all_consumers(channel):
                    typer.echo(ConsumerOut.of(info).model_dump_json())

        run(each())
        return

    async def go() -> list[ConsumerInfo]:
        async with open_admin(log) as admin:
            return await admin.consumers(channel, limit=TABLE_ROWS + 1)

    found = run(go())
    more = len(found) > TABLE_ROWS
    found = found[:TABLE_ROWS]
    if not found:
        err_console.print("no durable consumers" + (f" of {channel!r}" if channel else ""))
        return
    table = Table("Channel", "Consumer", "Epoch", "Position", "Lag", "Updated", "Holder")
    for info in found:
        table.add_row(
            escape(info.channel),
            escape(info.name),
            _text(info.epoch),
            _text(info.position),
            _lag(info),
            _text(info.updated_at),
            _text(info.holder) if info.holder else "[dim]free[/]",
        )
    print_table(table)
    if more:
        # A table of 250,000 rows took two minutes and 1.3 GB: JSON lines stream.
        err_console.print(f"more: the first {TABLE_ROWS:,} shown; --json lists every consumer")


@consumer.command("set")
def set_position(
    channel: Channel,
    name: Name,
    position: Annotated[int, typer.Argument(min=0, help="Its next holder starts after it.")],
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Set a consumer's position (created if needed); refused while a process holds it."""

    async def go() -> ConsumerInfo:
        async with open_admin(log) as admin:
            return await admin.set_consumer(channel, name, position)

    console.print(_describe(run(go())))


@consumer.command("delete")
def delete(channel: Channel, name: Name, log: LogOption = DEFAULT_LOG) -> None:
    """Forget a consumer and its position; refused while a process holds it."""

    async def go() -> None:
        async with open_admin(log) as admin:
            await admin.delete_consumer(channel, name)

    run(go())
    console.print(f"deleted consumer {escape(repr(name))} of {escape(repr(channel))}")


@consumer.command("prune")
def prune(
    idle_days: Annotated[
        float,
        typer.Option(
            "--idle-days", min=0.0, help="Delete those nobody held nor committed to for that long."
        ),
    ],
    channel: Annotated[str | None, typer.Option(help="Only this channel's consumers.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Forget the consumers nobody held nor committed to for --idle-days (a
    worker that comes back after that starts from its since/history again)."""
    idle = timedelta(days=idle_days) if 0 < idle_days <= MAX_IDLE.days else timedelta(0)
    if idle < timedelta(microseconds=1):
        raise typer.BadParameter(
            f"a microsecond to {MAX_IDLE.days:,} days", param_hint="--idle-days"
        )
    of = f" of {channel!r}" if channel else ""
    days = f"{idle_days:g} day{'' if idle_days == 1 else 's'}"
    if not yes:
        typer.confirm(
            f"Forget the consumers{of} that nobody held nor committed to for {days}?",
            abort=True,
            err=True,
        )

    async def go() -> int:
        async with open_admin(log) as admin:
            return await admin.delete_idle_consumers(idle, channel=channel)

    deleted = run(go())
    console.print(f"deleted {deleted} idle consumer{'s' if deleted != 1 else ''}{escape(of)}")
