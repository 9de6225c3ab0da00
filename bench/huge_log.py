"""What the operator's reads cost on a log with many channel and consumer rows.

Run ``python -m bench.huge_log`` (``--channels``, ``--consumers`` for the row counts,
``--logs`` for ``sqlite`` and/or ``postgres``). The log gets the channel rows of
``bench.retention_scan`` (a tenth with 3 events, the rest trimmed empty) and durable
consumers written in bulk, ten per channel on every fortieth channel, each with a
committed position. Then each page read runs six times (the median is reported;
walks, exports and deletions once): what a call returns is small, so its time
should not follow the size of the log. Last, the idle consumers are deleted.

Results: ``build/bench/huge_log.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from broadcast_history import Broadcast
from broadcast_history.admin import HistoryAdmin

from .configs import OUT, POSTGRES_DB, postgres_up
from .retention_scan import _fill_postgres, _fill_sqlite, empty_log

DATABASE = f"{POSTGRES_DB}_huge"
PER_CHANNEL = 10
CONSUMER_COLUMNS = ["channel", "name", "epoch", "position", "updated_at"]


def _consumer_rows(channels: int, consumers: int) -> list[tuple[Any, ...]]:
    """Ten consumers on every fortieth channel (with events or not), as many as asked."""
    now = int(time.time() * 1_000_000)
    rows: list[tuple[Any, ...]] = []
    for i in range(0, channels, 40):
        for j in range(PER_CHANNEL):
            if len(rows) == consumers:
                return rows
            # The channel's epoch is i + 1 (retention_scan's rows): lags are real.
            rows.append((f"user:{i:08d}", f"worker-{j:02d}", i + 1, 4, now))
    return rows


def _fill_consumers_sqlite(path: Path, rows: list[tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(path)
    try:
        names = ", ".join(CONSUMER_COLUMNS)
        conn.executemany(f"INSERT INTO broadcast_consumers ({names}) VALUES (?, ?, ?, ?, ?)", rows)
        conn.commit()
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def _fill_consumers_postgres(url: str, rows: list[tuple[Any, ...]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.copy_records_to_table(
            "broadcast_consumers", records=rows, columns=CONSUMER_COLUMNS
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _median_ms(call: Callable[[], Awaitable[Any]], times: int = 5) -> float:
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        await call()
        spent.append(time.perf_counter() - started)
    return statistics.median(spent) * 1e3


async def _reads(admin: HistoryAdmin, channels: int, consumers: int) -> dict[str, float]:
    """Each read's median time in milliseconds."""
    log = admin.log
    deep = _consumer_rows(channels, consumers)[int(consumers * 0.9)]
    sparse = f"user:{channels - 100:08d}"[:-2]  # the last hundred channels
    wide = f"user:{channels // 2:08d}"[:-4]  # ten thousand channels, a tenth stored

    async def walk() -> None:
        assert sum([1 async for _ in admin.all_consumers()]) == consumers

    async def export() -> None:
        assert sum([1 async for _ in admin.export_jsonl(prefix=wide)]) > 10_000

    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "channels page, no prefix": lambda: admin.channels(limit=100),
        "channels page, absent prefix": lambda: admin.channels(prefix="nobody:", limit=100),
        "channels page, prefix of 100": lambda: admin.channels(prefix=sparse, limit=100),
        "consumers page, first": lambda: admin.consumers(limit=1000),
        "consumers page, at 90 %": lambda: admin.consumers(after=deep[:2], limit=1000),
        # Six calls of one statement make Postgres plan it once for all parameters:
        # pages of 10,000 first, then of 1,000 again (a review found a plan that
        # did well on the latter alone).
        "consumers page of 10,000, at 90 %": lambda: admin.consumers(after=deep[:2], limit=10_000),
        "consumers page, at 90 %, after those": lambda: admin.consumers(after=deep[:2], limit=1000),
        "consumer_lags(1000)": lambda: log.consumer_lags(1000),
        "all_consumers() walk": walk,
        "export of 10,000 channels": export,
        # Last: the second deletes every consumer.
        "delete_idle_consumers(), none idle": lambda: admin.delete_idle_consumers(
            timedelta(days=1)
        ),
        "delete_idle_consumers(), all idle": lambda: admin.delete_idle_consumers(
            timedelta(microseconds=1)
        ),
    }
    return {
        name: await _median_ms(call, 6 if "page" in name or "lags" in name else 1)
        for name, call in reads.items()
    }


async def run_log(kind: str, channels: int, consumers: int, workdir: Path) -> dict[str, float]:
    rows = _consumer_rows(channels, consumers)
    assert len(rows) == consumers, f"{channels} channels hold at most {len(rows)} consumers"
    path = workdir / "huge_log.db"
    url = await empty_log(kind, path, DATABASE)
    async with Broadcast(log=url) as broadcast:  # creates the schema
        if kind == "sqlite":
            await asyncio.to_thread(_fill_sqlite, path, channels)
            await asyncio.to_thread(_fill_consumers_sqlite, path, rows)
        else:
            await _fill_postgres(url, channels)
            await _fill_consumers_postgres(url, rows)
        return await _reads(HistoryAdmin(broadcast.log), channels, consumers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.huge_log", description=__doc__)
    parser.add_argument("--channels", type=int, default=1_000_000, help="channel rows")
    parser.add_argument("--consumers", type=int, default=250_000, help="consumer rows")
    parser.add_argument("--logs", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--out", default=str(OUT), help="directory for huge_log.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for kind in [k.strip() for k in args.logs.split(",")]:
        if kind == "postgres" and not postgres_up():
            print("skipped postgres: not reachable")
            continue
        results[kind] = asyncio.run(run_log(kind, args.channels, args.consumers, out))
    (out / "huge_log.json").write_text(json.dumps(results, indent=2))
    print(f"{args.channels:,} channel rows, {args.consumers:,} consumers; ms (median of 6)")
    print("| Read | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in next(iter(results.values()), {}):
        print(f"| {name} | " + " | ".join(f"{r[name]:,.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
