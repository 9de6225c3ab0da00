"""Options every command shares: where the log is, which transport, output form."""

from __future__ import annotations

from typing import Annotated

import typer

#: Where the log is when neither ``--log`` nor ``BROADCAST_HISTORY_LOG`` says: a SQLite
#: file in the current directory, so ``tail`` and ``publish`` in two terminals meet.
DEFAULT_LOG = "sqlite+aiosqlite:///broadcast_history.db"
DEFAULT_URL = "memory://"

LogOption = Annotated[
    str,
    typer.Option(
        "--log",
        envvar="BROADCAST_HISTORY_LOG",
        help="Event log database URL (sqlite+aiosqlite:///FILE or postgresql+asyncpg://...).",
    ),
]
UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="BROADCAST_URL",
        help="Live transport URL (memory://, redis://, postgres://, kafka://...).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON output, one object per line.")]
