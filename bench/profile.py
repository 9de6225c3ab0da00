"""Profile one target scenario with cProfile and print where the time goes.

``python -m bench.profile concurrent --config redis+postgres`` runs the scenario once
in this process under cProfile (fresh log, as the suite) and prints the share of the
profiled time per area (waiting in ``epoll``, each ``broadcast_history`` module,
SQLAlchemy, asyncpg, sqlite3/aiosqlite, redis-py, asyncio, json, ...) and the
functions with the most time of their own. ``--out FILE`` keeps the pstats file
(``python -m pstats FILE``, or snakeviz). cProfile adds a roughly constant cost per
Python call, so many small functions look heavier than they are: compare shares
between runs of this tool, not with wall-clock rates of the suite.

Targets: ``concurrent`` (the plain public-API run of :mod:`bench.plain_api`),
``sequential``, ``replay``, ``channels`` (64 publishers round-robin over 100
channels) and ``catch_up`` (100 reconnecting subscribers, 2,000 events/s asked).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import plain_api, scenarios
from .configs import BY_NAME, mysql_up, postgres_up, redis_up
from .worker import _make

AREAS = (
    ("select.epoll", "idle: waiting in epoll"),
    ("broadcast_history/", None),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("aiosqlite/", "aiosqlite"),
    ("sqlite3", "sqlite3 (driver)"),
    ("redis/", "redis-py"),
    ("asyncio/", "asyncio (event loop, futures, tasks)"),
    ("json/", "json"),
    ("bench/", "bench (the scenario itself)"),
)


def _area(filename: str, name: str) -> str:
    where = f"{filename}:{name}"
    for marker, label in AREAS:
        if marker in where:
            if label is None:
                module = filename.split("broadcast_history/", 1)[1]
                return f"broadcast_history/{module}"
            return label
    if filename == "~" and ("Future" in name or "Task" in name or "_asyncio" in name):
        return "asyncio (event loop, futures, tasks)"
    return "other (builtins, stdlib)"


def report(stats: pstats.Stats, top: int) -> str:
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values()) or 1.0
    areas: dict[str, float] = defaultdict(float)
    functions = []
    for (filename, line, name), (_, calls, tottime, _, _) in entries.items():
        areas[_area(filename, name)] += tottime
        short = filename.rsplit("site-packages/", 1)[-1]
        functions.append((tottime, calls, f"{short}:{line}({name})"))
    lines = [f"profiled time {total:.3f} s (own time of every function)", "", "By area:"]
    for label, seconds in sorted(areas.items(), key=lambda item: -item[1]):
        if seconds / total >= 0.005:
            lines.append(f"  {100 * seconds / total:5.1f}%  {label}")
    lines += ["", f"Top {top} functions by own time:"]
    for tottime, calls, where in sorted(functions, reverse=True)[:top]:
        lines.append(f"  {100 * tottime / total:5.1f}%  {calls:>9,} calls  {where}")
    return "\n".join(lines)


async def _scenario(target: str, config: str, size: int) -> Any:
    """Returns the scenario's figures; runs it on a fresh broadcast like the suite."""
    if target == "concurrent":
        options = {"config": config, "events": size or 20_000, "publishers": 64, "size": 99}
        options.update(warm_up=False, keep_subscription=False, iterate=False)
        return await plain_api.one_run(options)
    scenario, params = {
        "sequential": ("sequential", {"n": size or 5000}),
        "replay": ("replay", {"size": size or 300_000}),
        "channels": ("concurrent", {"n": size or 64_000, "channels": 100}),
        "catch_up": ("catch_up", {"preload": 10_000, "duration": 10.0}),
    }[target]
    job = {"impl": "ours", "config": config, "scenario": scenario, "params": params}
    broadcast, garbage = await _make(job, BY_NAME[config])  # builds big logs if needed
    try:
        async with broadcast:
            return await scenarios.SCENARIOS[scenario](broadcast, **params)
    finally:
        for path in garbage:
            Path(path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    targets = ["concurrent", "sequential", "replay", "channels", "catch_up"]
    parser.add_argument("target", choices=targets)
    parser.add_argument("--config", default="memory+sqlite")
    parser.add_argument("--size", type=int, default=0, help="events (log size for replay)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="write the pstats file here")
    args = parser.parse_args(argv)
    config = BY_NAME[args.config]
    # As the suite does: these also create the benchmark databases a fresh server lacks.
    for needed, up in (("postgres", postgres_up), ("mysql", mysql_up), ("redis", redis_up)):
        if needed in (config.transport, config.log) and not up():
            parser.error(f"{args.config} needs {needed}, which does not answer")
    profiler = cProfile.Profile()

    async def run() -> Any:
        profiler.enable()
        try:
            return await _scenario(args.target, args.config, args.size)
        finally:
            profiler.disable()

    began = time.perf_counter()
    figures = asyncio.run(run())
    print(f"{args.target} on {args.config}: {json.dumps(figures)}")
    print(f"wall {time.perf_counter() - began:.2f} s (profiled, so slower than the suite)\n")
    if args.out:
        profiler.dump_stats(args.out)
    print(report(pstats.Stats(profiler), args.top))


if __name__ == "__main__":
    main()
