"""Concurrent publish through the plain public API, as an application would write it.

``python -m bench.plain_api --config redis+postgres`` (or ``memory+sqlite``): a fresh
``Broadcast``, one subscriber task calling ``get()``, 64 tasks each awaiting
``broadcast.publish`` in a loop, 20,000 events of 99 characters on one channel; the rate
is events over the time from the first publish to the last event received. No warm-up
and no other subscription, unlike the suite: that is the point of this script.

Each run is a fresh process (``--repeats``, default 5) against a fresh log (a new
SQLite file, or the benchmark Postgres database emptied). Printed: the median
[min - max] of the rate, of the time until the last publish returned, of the process's
CPU time per event, of the mean number of events per log transaction (counted by
wrapping ``broadcast.log.append``, one call per transaction), of the time
``connect()`` and ``subscribe()`` took before the first publish, and the rate a timer
started before ``connect()`` would show.

``--like-suite`` runs the same workload the way the suite's ``concurrent`` scenario
does (warm-up, a held idle subscription, ``async for``, its 79-character messages), and
``--events``, ``--size``, ``--publishers``, ``--warm-up``, ``--keep-subscription``,
``--iterate`` and ``--suite-message`` switch the differences one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .configs import BY_NAME, OUT, ROOT, postgres_log_url, postgres_up, redis_up
from .worker import _empty_postgres

CONFIGS = ("memory+sqlite", "redis+postgres")


async def _broadcast(config: str) -> tuple[Any, list[Path]]:
    from broadcast_history import Broadcast

    conf = BY_NAME[config]
    if conf.log == "sqlite":
        (OUT / "tmp").mkdir(parents=True, exist_ok=True)
        path = OUT / "tmp" / f"plain-{uuid.uuid4().hex}.db"
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        return Broadcast(conf.ours_url(None), log=f"sqlite+aiosqlite:///{path}"), files
    await _empty_postgres()
    return Broadcast(conf.ours_url(None), log=postgres_log_url()), []


async def one_run(options: dict[str, Any]) -> dict[str, float]:
    """One measurement, in this process."""
    events, publishers = options["events"], options["publishers"]
    message = "x" * options["size"]
    broadcast, files = await _broadcast(options["config"])
    transactions = 0
    opened = time.perf_counter()
    try:
        async with broadcast:
            append = broadcast.log.append

            async def counting_append(items: Any) -> Any:
                nonlocal transactions
                transactions += 1
                return await append(items)

            broadcast.log.append = counting_append  # type: ignore[method-assign]
            if options["warm_up"]:
                from .scenarios import warm_up

                await warm_up(broadcast)
            keep = None
            if options["keep_subscription"]:
                keep = broadcast.subscribe(f"plain-keep-{uuid.uuid4().hex[:8]}")
                await keep.__aenter__()
            channel = f"plain-{uuid.uuid4().hex[:8]}"
            transactions = 0
            async with broadcast.subscribe(channel) as subscription:

                async def subscriber() -> None:
                    if options["iterate"]:
                        received = 0
                        async for _event in subscription:
                            received += 1
                            if received == events:
                                return
                    else:
                        for _ in range(events):
                            await subscription.get()

                async def publisher(count: int) -> None:
                    if options.get("suite_message"):
                        from .scenarios import message as suite_message

                        for k in range(count):
                            await broadcast.publish(channel, suite_message(k))
                        return
                    for _ in range(count):
                        await broadcast.publish(channel, message)

                base, extra = divmod(events, publishers)
                shares = [base + (p < extra) for p in range(publishers)]
                reader = asyncio.create_task(subscriber())
                cpu = time.process_time()
                began = time.perf_counter()
                setup = began - opened
                await asyncio.gather(*(publisher(n) for n in shares))
                published = time.perf_counter() - began
                await asyncio.wait_for(reader, 120)
                elapsed = time.perf_counter() - began
                cpu = time.process_time() - cpu
            if keep is not None:
                await keep.__aexit__(None, None, None)
    finally:
        for path in files:
            path.unlink(missing_ok=True)
    return {
        "rate": events / elapsed,
        "setup_s": setup,
        "rate_with_setup": events / (setup + elapsed),
        "publish_s": published,
        "cpu_us_per_event": cpu / events * 1e6,
        "events_per_transaction": events / max(1, transactions),
    }


def _options(args: argparse.Namespace, config: str) -> dict[str, Any]:
    like = args.like_suite
    return {
        "config": config,
        "events": args.events,
        "publishers": args.publishers,
        "size": args.size,
        "warm_up": args.warm_up or like,
        "keep_subscription": args.keep_subscription or like,
        "iterate": args.iterate or like,
        "suite_message": args.suite_message or like,
    }


def _fmt(values: list[float], digits: int) -> str:
    median = statistics.median(values)
    return f"{median:,.{digits}f} [{min(values):,.{digits}f} - {max(values):,.{digits}f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_api", description=__doc__)
    parser.add_argument("--config", default="redis+postgres", help=", ".join(CONFIGS) + ", all")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--size", type=int, default=99, help="message length, characters")
    parser.add_argument("--repeats", type=int, default=5, help="runs, one process each")
    parser.add_argument("--warm-up", action="store_true", help="200 events first, as the suite")
    parser.add_argument("--keep-subscription", action="store_true", help="hold an idle one")
    parser.add_argument("--iterate", action="store_true", help="async for instead of get()")
    parser.add_argument(
        "--suite-message", action="store_true", help="the suite's 79-char messages (--size unused)"
    )
    parser.add_argument("--like-suite", action="store_true", help="the four switches above")
    parser.add_argument("--json", help="also write the runs to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single run (internal)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(one_run(json.loads(args.one)))), flush=True)
        return
    configs = list(CONFIGS) if args.config == "all" else args.config.split(",")
    report: dict[str, Any] = {"argv": sys.argv[1:], "results": {}}
    for config in configs:
        if "postgres" in config and not postgres_up():
            print(f"{config}: skipped, no Postgres")
            continue
        if "redis" in config and not redis_up():
            print(f"{config}: skipped, no Redis")
            continue
        options = _options(args, config)
        runs = []
        for _ in range(args.repeats):
            done = subprocess.run(
                [sys.executable, "-m", "bench.plain_api", "--one", json.dumps(options)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode:
                raise SystemExit(f"{config}: run failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        report["results"][config] = {"options": options, "runs": runs}
        print(
            f"{config:15} rate {_fmt([r['rate'] for r in runs], 0)} /s"
            f"  publish {_fmt([r['publish_s'] for r in runs], 3)} s"
            f"  CPU {_fmt([r['cpu_us_per_event'] for r in runs], 1)} us/event"
            f"  events/transaction {_fmt([r['events_per_transaction'] for r in runs], 1)}"
            f"  connect+subscribe {_fmt([r['setup_s'] for r in runs], 3)} s"
            f"  rate counting them {_fmt([r['rate_with_setup'] for r in runs], 0)} /s"
            f"  ({len(runs)} runs)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
