"""SQLite hot paths: appends and event reads, each in one hop to a thread.

Through aiosqlite every statement is a round trip to the driver's thread, and a batch
needs five (BEGIN, read counters, insert, update counters, COMMIT). Running the batch
as one synchronous function on a dedicated thread pays a single hop instead, which
is what makes group commit on SQLite fast. Event reads do the same on reader threads,
which also lets them stop after a byte budget: SQLite steps one row at a time, so a
page of large events is cut before the rest of it is ever read from disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Executable, bindparam, select, update
from sqlalchemy.dialects.sqlite import insert

from .._event import Event, from_micros
from ._rows import EVENT_COLUMNS, new_epoch, now_micros, row_to_event, rows_to_events
from ._schema import channels, events

_INSERT_CHANNEL = insert(channels).on_conflict_do_nothing(index_elements=["name"])
_UPDATE_COUNTER = (
    update(channels)
    .where(channels.c.name == bindparam("b_name"))
    .values(last_offset=bindparam("b_last"), last_timestamp=bindparam("b_ts"))
)


class SqliteReader:
    """Runs event reads on a few threads with SQLAlchemy's synchronous engine."""

    def __init__(self, engine: Engine, threads: int = 2) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="broadcast-history-read")

    async def read(
        self, channel: str, query: Executable, max_bytes: int | None = None
    ) -> list[Event]:
        """The events of rows selected with :data:`EVENT_COLUMNS` by ``query``.

        With ``max_bytes``, rows are taken until their payloads reach or pass it (at
        least one): the row that passes it shows the caller the page was cut.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read, channel, query, max_bytes)

    def _read(self, channel: str, query: Executable, max_bytes: int | None) -> list[Event]:
        with self._engine.connect() as conn:
            result = conn.execute(query)
            if max_bytes is None:
                return rows_to_events(channel, result)
            rows: list[Any] = []
            total = 0
            for row in result:
                rows.append(row)
                total += len(row[4])
                if total >= max_bytes:
                    break
            result.close()
            return rows_to_events(channel, rows)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._engine.dispose()


class SqliteWriter:
    """Runs append transactions on one thread with SQLAlchemy's synchronous engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="broadcast-history-writer")

    async def append(self, items: Sequence[Any]) -> list[Event]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._append, items)

    def _append(self, items: Sequence[Any]) -> list[Event]:
        with self._engine.connect() as conn:
            conn = conn.execution_options(bh_write=True)
            with conn.begin():
                return append(conn, items)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._engine.dispose()


def _counters(conn: Connection, names: Sequence[str]) -> dict[str, list[int]]:
    result = conn.execute(
        select(
            channels.c.name, channels.c.epoch, channels.c.last_offset, channels.c.last_timestamp
        ).where(channels.c.name.in_(names))
    )
    return {name: [epoch, last, ts] for name, epoch, last, ts in result}


def _find_keys(conn: Connection, items: Sequence[Any]) -> dict[tuple[str, str], Event]:
    by_channel: dict[str, set[str]] = {}
    for channel, _, key in items:
        if key is not None:
            by_channel.setdefault(channel, set()).add(key)
    found: dict[tuple[str, str], Event] = {}
    for channel, keys in by_channel.items():
        result = conn.execute(
            select(*EVENT_COLUMNS).where(
                events.c.channel == channel, events.c.key.in_(sorted(keys))
            )
        )
        for row in result:
            found[(channel, row.key)] = row_to_event(channel, row)
    return found


def append(conn: Connection, items: Sequence[Any]) -> list[Event]:
    """Store ``items`` (channel, message, key) in ``conn``'s write transaction.

    The transaction holds SQLite's write lock from its start (BEGIN IMMEDIATE), so the
    counters read here cannot change before the update: offsets are gap-free across
    processes sharing the file.
    """
    names = sorted({item[0] for item in items})
    state = _counters(conn, names)
    missing = [name for name in names if name not in state]
    if missing:
        conn.execute(
            _INSERT_CHANNEL,
            [
                {
                    "name": name,
                    "epoch": new_epoch(),
                    "last_offset": 0,
                    "last_timestamp": 0,
                    "first_offset": 1,
                }
                for name in missing
            ],
        )
        state.update(_counters(conn, missing))
    seen = _find_keys(conn, items) if any(item[2] is not None for item in items) else {}

    now = now_micros()
    stamps: dict[int, datetime] = {}
    results: list[Event] = []
    rows: list[dict[str, Any]] = []
    for channel, message, key in items:
        if key is not None:
            earlier = seen.get((channel, key))
            if earlier is not None:
                results.append(earlier)
                continue
        counter = state[channel]
        counter[1] += 1
        if now > counter[2]:
            counter[2] = now
        epoch, offset, micros = counter
        stamp = stamps.get(micros)
        if stamp is None:
            stamp = stamps[micros] = from_micros(micros)
        is_text = isinstance(message, str)
        rows.append(
            {
                "channel": channel,
                "offset": offset,
                "epoch": epoch,
                "timestamp": micros,
                "is_text": is_text,
                "payload": message.encode() if is_text else message,
                "key": key,
            }
        )
        event = Event(channel, message, offset, stamp, epoch, key)
        if key is not None:
            seen[(channel, key)] = event
        results.append(event)
    if rows:
        conn.execute(events.insert(), rows)
        touched = {row["channel"] for row in rows}
        conn.execute(
            _UPDATE_COUNTER,
            [{"b_name": n, "b_last": state[n][1], "b_ts": state[n][2]} for n in touched],
        )
    return results
