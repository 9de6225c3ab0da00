"""The Typer app, the connection options every command shares, and error handling.

Exit codes: 0 success; 1 not found, conflict or other failure; 2 bad arguments (bad
URL, bad time, invalid channel name); 3 the database cannot be reached or its schema
is not current.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import _parse as times
from .._broadcast import Broadcast
from .._errors import BroadcastError, InvalidArgument, LogError
from ..admin import HistoryAdmin, ImportConflict, NotFound
from ..log import EventLog

T = TypeVar("T")

app = typer.Typer(
    name="broadcast-history",
    help="Inspect and manage a broadcast_history event log.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(highlight=False)
# Messages are not hard-wrapped: they stay greppable and copy-pastable.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_table(table: Table) -> None:
    """Print ``table``: fitted to a terminal; piped or redirected, no value is cut."""
    if console.is_terminal:
        console.print(table)
    else:
        # Rich takes a pipe for 80 columns and would cut cells short with an
        # ellipsis; grep and files want whole values. A table is as wide as its cells.
        Console(file=console.file, highlight=False, width=100_000).print(table)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as an error and exit with ``code``."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}")
    raise typer.Exit(code)


def exit_code(error: BaseException) -> int:
    """The exit code for ``error`` (see the module docstring)."""
    if isinstance(error, (NotFound, ImportConflict)):
        return 1
    if isinstance(error, (InvalidArgument, ValueError)):
        return 2
    if isinstance(error, LogError):
        return 3
    return 1


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``, turning library errors into a message and an exit code."""
    try:
        return asyncio.run(coro)
    except (BroadcastError, ValueError) as exc:
        fail(str(exc), exit_code(exc))
    except ImportError as exc:  # a driver's extra is not installed; the message names it
        fail(str(exc), 1)


def parse_time(value: str | None, option: str) -> datetime | None:
    """An aware datetime from ISO 8601 text (``Z`` allowed); naive times are refused."""
    try:
        return None if value is None else times.parse_time(value, option)
    except InvalidArgument as exc:
        fail(str(exc), 2)


@asynccontextmanager
async def open_admin(log: str, *, must_exist: bool = True) -> AsyncIterator[HistoryAdmin]:
    """A connected log wrapped in :class:`HistoryAdmin` (no live transport).

    It creates the tables in an empty database, as the app would, but never upgrades
    an existing schema: processes of the older version may still be running on it,
    and ``db upgrade`` is the deliberate step for that.
    """
    event_log = _lasting(EventLog(log, migrate="create", must_exist=must_exist))
    await event_log.connect()
    try:
        yield HistoryAdmin(event_log)
    finally:
        await event_log.disconnect()


@asynccontextmanager
async def open_broadcast(url: str, log: str, **options: Any) -> AsyncIterator[Broadcast]:
    """A connected broadcast over the live transport ``url`` and the log (whose schema
    is created if missing, never upgraded, as in :func:`open_admin`)."""
    event_log = _lasting(EventLog(log, migrate="create"))
    async with Broadcast(url, log=event_log, **options) as broadcast:
        yield broadcast


def _lasting(log: EventLog) -> EventLog:
    """``log``, unless it is in memory: it would end with the command (a publish
    reported stored, then gone; reads of an empty log)."""
    if log.private:
        raise InvalidArgument(
            "an in-memory SQLite log ends with this command: give a file "
            "(sqlite+aiosqlite:///events.db) or a database server's URL"
        )
    return log


def flush() -> None:
    """Push output through a pipe now (``tail`` is often piped)."""
    sys.stdout.flush()
