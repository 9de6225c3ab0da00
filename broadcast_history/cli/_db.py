"""``db upgrade|current|check``: the log's schema, through the shipped Alembic migrations."""

from __future__ import annotations

import typer
from rich.markup import escape

from .._redact import redacted
from ..log import EventLog, head_revision, known_revision, schema_revision
from ._app import app, console, err_console, run
from ._options import DEFAULT_LOG, LogOption

db = typer.Typer(help="Manage the event log's database schema (Alembic).", no_args_is_help=True)
app.add_typer(db, name="db")


async def _revisions(log: str) -> tuple[str | None, str | None]:
    """(current revision of the database, newest shipped revision)."""
    return await schema_revision(log), head_revision()


@db.command()
def upgrade(log: LogOption = DEFAULT_LOG) -> None:
    """Create the log's tables or upgrade them to this version's schema."""

    async def go() -> None:
        event_log = EventLog(log, migrate=True)
        await event_log.connect()
        await event_log.disconnect()

    run(go())
    console.print(f"{escape(redacted(log))}: schema at {head_revision()}")


@db.command()
def current(log: LogOption = DEFAULT_LOG) -> None:
    """Print the revision the database is at, and the newest one shipped."""
    at, head = run(_revisions(log))
    console.print(f"current: {at or '(no schema)'}\nhead:    {head}")


@db.command()
def check(log: LogOption = DEFAULT_LOG) -> None:
    """Exit 0 if the schema is current; 1 (with a message) if it needs `db upgrade`."""
    at, head = run(_revisions(log))
    if at != head:
        if known_revision(at):
            advice = f"this version needs {head}: run `broadcast-history db upgrade`"
        else:
            advice = (
                f"newer than this version knows ({head}): upgrade broadcast_history "
                "(`db upgrade` cannot go back)"
            )
        where = "has no schema yet" if at is None else f"schema is at {at}"
        err_console.print(f"{where}, {advice}")
        raise typer.Exit(1)
    console.print(f"schema is current ({head})")
