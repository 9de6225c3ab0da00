"""What a retention pass costs when a log holds many channel rows (docs/performance.md).

Run ``python -m bench.retention_scan`` (``--channels`` to pick the number of rows,
``--logs`` for ``sqlite`` and/or ``postgres``). The log gets that many channel rows,
written in bulk through the database driver: a tenth hold 3 events, the rest had all
of theirs trimmed (a channel row outlives its events), as per-user or per-session
channels leave them. Then ``retention_pass`` runs three times for each retention, with
nothing to remove: the time is the search for channels due, which reads every row,
and the spacing is how long a connected broadcast then waits before its next pass.

Results: ``build/bench/retention_scan.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from broadcast_history import Broadcast, Retention
from broadcast_history._broadcast import RETENTION_SPACING

from .configs import (
    OUT,
    POSTGRES_DB,
    create_postgres_database,
    postgres_log_url,
    postgres_up,
)

DATABASE = f"{POSTGRES_DB}_retention"
RETENTIONS = {
    "max_events": Retention(max_events=100),
    "max_age": Retention(max_age=timedelta(hours=1)),
    "both": Retention(max_events=100, max_age=timedelta(hours=1)),
}
CHANNEL_COLUMNS = [
    "name",
    "epoch",
    "last_offset",
    "last_timestamp",
    "first_offset",
    "trimmed_timestamp",
]
EVENT_COLUMNS = ["channel", "offset", "epoch", "timestamp", "is_text", "payload", "key"]


def _rows(channels: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Channel rows (every tenth with events 3 to 5 stored) and their events."""
    now = int(time.time() * 1_000_000)
    rows = [
        (f"user:{i:08d}", i + 1, 5, now, 3 if i % 10 == 0 else 6, None) for i in range(channels)
    ]
    stored = [
        (f"user:{i:08d}", offset, i + 1, now, True, b"x", None)
        for i in range(0, channels, 10)
        for offset in (3, 4, 5)
    ]
    return rows, stored


def _fill_sqlite(path: Path, channels: int) -> None:
    rows, stored = _rows(channels)
    conn = sqlite3.connect(path)
    try:
        names = ", ".join(CHANNEL_COLUMNS)
        conn.executemany(
            f"INSERT INTO broadcast_channels ({names}) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
        names = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
        conn.executemany(
            f"INSERT INTO broadcast_events ({names}) VALUES (?, ?, ?, ?, ?, ?, ?)", stored
        )
        conn.commit()
    finally:
        conn.close()


async def _fill_postgres(url: str, channels: int) -> None:
    import asyncpg

    rows, stored = _rows(channels)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("TRUNCATE broadcast_events, broadcast_channels, broadcast_consumers")
        await conn.copy_records_to_table(
            "broadcast_channels", records=rows, columns=CHANNEL_COLUMNS
        )
        await conn.copy_records_to_table("broadcast_events", records=stored, columns=EVENT_COLUMNS)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def empty_log(kind: str, path: Path, database: str) -> str:
    """The URL of an empty log: the SQLite file ``path``, or a new Postgres
    ``database`` (its tables are created by the first broadcast connected)."""
    if kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite+aiosqlite:///{path}"
    await create_postgres_database(database)
    return postgres_log_url(database)


async def run_log(kind: str, channels: int, workdir: Path) -> dict[str, Any]:
    path = workdir / "retention_scan.db"
    url = await empty_log(kind, path, DATABASE)
    async with Broadcast(log=url) as broadcast:  # creates the schema
        if kind == "sqlite":
            await asyncio.to_thread(_fill_sqlite, path, channels)
        else:
            await _fill_postgres(url, channels)
        figures: dict[str, Any] = {}
        for name, retention in RETENTIONS.items():
            passes = [await broadcast.log.retention_pass(retention) for _ in range(3)]
            assert all(done.removed == 0 for done in passes)
            search = statistics.median(done.searching for done in passes)
            figures[name] = {
                "search_ms": search * 1e3,
                "spacing_s": max(retention.interval, search * RETENTION_SPACING),
            }
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention_scan", description=__doc__)
    parser.add_argument("--channels", type=int, default=1_000_000, help="channel rows")
    parser.add_argument("--logs", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--out", default=str(OUT), help="directory for retention_scan.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for kind in [k.strip() for k in args.logs.split(",")]:
        if kind == "postgres" and not postgres_up():
            print("skipped postgres: not reachable")
            continue
        results[kind] = asyncio.run(run_log(kind, args.channels, out))
    (out / "retention_scan.json").write_text(json.dumps(results, indent=2))
    print(f"{args.channels:,} channel rows; search time (median of 3), then the spacing")
    print("| Retention | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in RETENTIONS:
        cells = [
            f"{r[name]['search_ms']:.0f} ms, next in {r[name]['spacing_s']:.1f} s"
            for r in results.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
