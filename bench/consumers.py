"""What durable consumers cost: commits, lease renewal, standbys (docs/performance.md).

Run ``python -m bench.consumers`` (``--quick`` for a smoke run, ``--logs`` to pick
``sqlite`` and/or ``postgres``). Figures per log:

- **commit, one consumer**: ``sub.commit(event)`` awaited one after the other, each
  moving the position by one (the events were delivered before the clock starts).
- **commit, 100 consumers**: 100 consumers (10 on each of 10 channels) committing
  concurrently, each awaiting its own commits.
- **renewal, 1,000 consumers on 100 channels**: one broadcast holds them all; the
  renewal statements it sends over a window are counted and timed. The rate with
  the default 10 s lease is 3 / 10 s per broadcast; the window uses a 3 s lease to
  count more of them. Next to it, the same 1,000 leases renewed one statement each,
  as a per-consumer renewal would.
- **standbys**: a second broadcast waiting for the same 1,000 consumers; its calls
  asking for leases are counted over the window (each is one read of which consumers
  are held, plus an upsert when some are free).

``--stored N`` first stores N consumers of other channels (positions, no holder), as a
big deployment's table holds: what a renewal costs must not grow with them.

Results: ``build/bench/consumers.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broadcast_history import Broadcast, Event, Subscriber

from .configs import (
    OUT,
    POSTGRES_DB,
    create_postgres_database,
    postgres_log_url,
    postgres_up,
)

Figures = dict[str, Any]
DATABASE = f"{POSTGRES_DB}_consumers"


def _channel(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _take(sub: Subscriber, count: int) -> list[Event]:
    return [await sub.get() for _ in range(count)]


async def commit_one(broadcast: Broadcast, commits: int) -> Figures:
    channel = _channel("commit")
    for i in range(commits):
        await broadcast.publish(channel, str(i))
    async with broadcast.subscribe(channel, consumer="bench", since=0) as sub:
        events = await _take(sub, commits)
        started = time.perf_counter()
        for event in events:
            await sub.commit(event)
        elapsed = time.perf_counter() - started
    return {"commits": commits, "rate": commits / elapsed, "mean_ms": elapsed / commits * 1e3}


async def commit_many(broadcast: Broadcast, per_consumer: int) -> Figures:
    channels = [_channel("many") for _ in range(10)]
    for channel in channels:
        for i in range(per_consumer):
            await broadcast.publish(channel, str(i))

    async def consumer(channel: str, name: str, ready: asyncio.Event) -> float:
        async with broadcast.subscribe(channel, consumer=name, since=0) as sub:
            events = await _take(sub, per_consumer)
            await ready.wait()
            for event in events:
                await sub.commit(event)
            return time.perf_counter()

    ready = asyncio.Event()
    tasks = [
        asyncio.create_task(consumer(channel, f"c{n}", ready))
        for channel in channels
        for n in range(10)
    ]
    await asyncio.sleep(1)  # every consumer positioned, events in hand
    started = time.perf_counter()
    ready.set()
    ended = max(await asyncio.gather(*tasks))
    total = per_consumer * len(tasks)
    return {"consumers": len(tasks), "commits": total, "rate": total / (ended - started)}


def _timed(
    calls: list[tuple[float, int]], method: Callable[..., Awaitable[Any]], size: int = 0
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(*args)
        finally:
            calls.append((time.perf_counter() - started, size or len(args[0])))

    return wrapper


async def renewal(log: str, window: float, lease: float = 3.0) -> Figures:
    channels = [_channel("lease") for _ in range(100)]
    async with Broadcast(log=log) as holders, Broadcast(log=log) as standbys:
        for channel in channels:
            await holders.publish(channel, "first")
        renewals: list[tuple[float, int]] = []
        attempts: list[tuple[float, int]] = []
        holders.log.renew_leases = _timed(renewals, holders.log.renew_leases)  # type: ignore[method-assign]
        firsts: list[tuple[float, int]] = []  # each standby asks once alone, then with all
        standbys.log.acquire_lease = _timed(firsts, standbys.log.acquire_lease, 1)  # type: ignore[method-assign]
        standbys.log.acquire_leases = _timed(attempts, standbys.log.acquire_leases)  # type: ignore[method-assign]
        done = asyncio.Event()
        held: list[Subscriber] = []

        async def hold(broadcast: Broadcast, channel: str, name: str) -> None:
            async with broadcast.subscribe(channel, consumer=name, lease=lease) as sub:
                held.append(sub)
                await done.wait()

        pairs = [(channel, f"c{n}") for channel in channels for n in range(10)]
        started = time.perf_counter()
        holding = [asyncio.create_task(hold(holders, *pair)) for pair in pairs]
        while len(held) < len(pairs):
            await asyncio.sleep(0.01)
        acquired = time.perf_counter() - started
        waiting = [asyncio.create_task(hold(standbys, *pair)) for pair in pairs]
        while len(firsts) < len(pairs):  # until every standby asked once, alone
            await asyncio.sleep(0.05)
        renewals.clear()
        attempts.clear()
        firsts.clear()
        await asyncio.sleep(window)
        in_window = list(renewals), list(attempts) + list(firsts)
        lost = sum(sub._consumer is None or sub._consumer.lost for sub in held)

        # The same leases renewed one statement per consumer, for comparison.
        ids = [
            (sub._consumer.channel, sub._consumer.name, sub._consumer.holder)
            for sub in held
            if sub._consumer is not None
        ]
        single_started = time.perf_counter()
        for one in ids:
            await holders.log.renew_leases([one], lease)
        single = (time.perf_counter() - single_started) / len(ids)

        done.set()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*holding)
        await asyncio.gather(*waiting, return_exceptions=True)

    renew_ms = [seconds * 1e3 for seconds, _ in in_window[0]]
    return {
        "consumers": len(pairs),
        "acquire_all_s": acquired,
        "lease_s": lease,
        "window_s": window,
        "renewal_statements": len(renew_ms),
        "renewal_per_s": len(renew_ms) / window,
        "renewal_per_s_default_lease": 3 / 10,
        "renewal_ms_mean": statistics.fmean(renew_ms) if renew_ms else float("nan"),
        "renewal_ms_max": max(renew_ms, default=float("nan")),
        "per_consumer_renewal_ms": single * 1e3,
        "per_consumer_renewal_per_s_default_lease": len(ids) * 3 / 10,
        "standby_attempts_per_s": len(in_window[1]) / window,
        "standby_ms_mean": statistics.fmean(s * 1e3 for s, _ in in_window[1])
        if in_window[1]
        else float("nan"),
        "lost_leases": lost,
    }


async def _postgres_log() -> str:
    import asyncpg

    await create_postgres_database(DATABASE)
    url = postgres_log_url(DATABASE)
    async with Broadcast(log=url) as broadcast:  # creates the schema
        del broadcast
    db = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await db.execute("TRUNCATE broadcast_events, broadcast_channels, broadcast_consumers")
    finally:
        await db.close()
    return url


async def _store_consumers(log: str, count: int) -> None:
    """``count`` rows of idle consumers of other channels, written directly."""
    rows = [(f"stored-{i // 10:07d}", f"c{i % 10}", 1, i, 0) for i in range(count)]
    insert = (
        "INSERT INTO broadcast_consumers (channel, name, epoch, position, updated_at) VALUES ({})"
    )
    if log.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(log.split("///", 1)[1]) as db:
            db.executemany(insert.format("?, ?, ?, ?, ?"), rows)
        return
    import asyncpg

    db = await asyncpg.connect(log.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await db.executemany(insert.format("$1, $2, $3, $4, $5"), rows)
        await db.execute("ANALYZE broadcast_consumers")
    finally:
        await db.close()


async def run_log(kind: str, quick: bool, workdir: Path, stored: int = 0) -> Figures:
    if kind == "sqlite":
        path = workdir / "consumers.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        log = f"sqlite+aiosqlite:///{path}"
    else:
        log = await _postgres_log()
    figures: Figures = {}
    async with Broadcast(log=log) as broadcast:
        figures["commit_one"] = await commit_one(broadcast, 300 if quick else 3000)
        figures["commit_100"] = await commit_many(broadcast, 20 if quick else 200)
    if stored:
        await _store_consumers(log, stored)
    figures["stored_consumers"] = stored
    figures["renewal"] = await renewal(log, window=3.0 if quick else 15.0)
    return figures


def _table(results: dict[str, Figures]) -> str:
    rows = [
        ("Other consumers stored", lambda f: f"{f.get('stored_consumers', 0):,}"),
        ("Commits/s, one consumer", lambda f: f"{f['commit_one']['rate']:,.0f}"),
        ("Commit latency, one consumer", lambda f: f"{f['commit_one']['mean_ms']:.2f} ms"),
        ("Commits/s, 100 consumers at once", lambda f: f"{f['commit_100']['rate']:,.0f}"),
        ("Taking 1,000 leases", lambda f: f"{f['renewal']['acquire_all_s']:.2f} s"),
        (
            "Renewal statements/s, 1,000 consumers (10 s lease)",
            lambda f: f"{f['renewal']['renewal_per_s_default_lease']:.1f}",
        ),
        (
            "Renewal statements/s measured (3 s lease)",
            lambda f: f"{f['renewal']['renewal_per_s']:.2f}",
        ),
        (
            "One renewal of all 1,000 leases",
            lambda f: (
                f"{f['renewal']['renewal_ms_mean']:.1f} ms (max "
                f"{f['renewal']['renewal_ms_max']:.1f})"
            ),
        ),
        (
            "Per-consumer renewal instead: statements/s, DB time/s",
            lambda f: (
                f"{f['renewal']['per_consumer_renewal_per_s_default_lease']:.0f}, "
                f"{f['renewal']['per_consumer_renewal_ms'] * 300:.0f} ms"
            ),
        ),
        (
            "Lease requests/s of 1,000 standbys (3 s lease)",
            lambda f: f"{f['renewal']['standby_attempts_per_s']:.1f}",
        ),
        ("Leases lost", lambda f: str(f["renewal"]["lost_leases"])),
    ]
    names = list(results)
    lines = [
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.consumers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short window")
    parser.add_argument("--logs", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--out", default=str(OUT), help="directory for consumers.json")
    parser.add_argument(
        "--stored", type=int, default=0, help="idle consumers of other channels stored first"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Figures] = {}
    for kind in [k.strip() for k in args.logs.split(",")]:
        if kind == "postgres" and not postgres_up():  # (creates the bench databases)
            print("skipped postgres: not reachable")
            continue
        results[kind] = asyncio.run(run_log(kind, args.quick, out, args.stored))
    (out / "consumers.json").write_text(json.dumps(results, indent=2))
    print(_table(results))


if __name__ == "__main__":
    main()
