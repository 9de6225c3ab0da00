"""How much of the 100-channel shortfall is the SQLite file's commit.

``python -m bench.channel_ratio [--rounds 5] [--events 64000]`` runs the suite's
concurrent scenario (64 publishers awaiting each publish, one subscriber per channel,
memory transport) on one channel and on 100, once with a SQLite file log and once with
an in-memory SQLite log, in rounds (each of the four once, then again), and prints
each run, then per log the median rate of each and the median of the rounds'
100-to-one ratios. The in-memory log runs the same statements, counters and B-trees
on its writer thread without writing a page to disk (though it never commits on the
loop and locks each call): its ratio estimates a log whose commit costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import uuid
from pathlib import Path

from broadcast_history import Broadcast

from . import scenarios

LOGS = ("file", "memory")
CHANNELS = (1, 100)


async def one_run(log: str, channels: int, events: int, directory: str) -> float:
    """Events per second of one concurrent run on a fresh broadcast."""
    path = Path(directory) / f"{uuid.uuid4().hex}.db"
    url = f"sqlite+aiosqlite:///{path}" if log == "file" else "sqlite+aiosqlite://"
    try:
        async with Broadcast("memory://", log=url) as broadcast:
            # Held throughout, as the suite's worker does.
            async with broadcast.subscribe("channel-ratio-keep"):
                figures = await scenarios.concurrent(broadcast, events, channels)
        return float(figures["rate"])
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


async def measure(rounds: int, events: int) -> list[str]:
    """Run the rounds; the summary lines."""
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for index in range(rounds):
            for log in LOGS:
                for channels in CHANNELS:
                    rate = await one_run(log, channels, events, directory)
                    rates.setdefault((log, channels), []).append(rate)
                    print(f"round {index + 1}: {log} log, {channels} channel(s): {rate:,.0f}/s")
    lines = []
    for log in LOGS:
        one, hundred = rates[(log, 1)], rates[(log, 100)]
        ratios = [h / o for o, h in zip(one, hundred, strict=True)]
        lines.append(
            f"{log} log: one channel {statistics.median(one):,.0f}/s, 100 channels "
            f"{statistics.median(hundred):,.0f}/s; ratio per round "
            f"{', '.join(f'{r:.2f}' for r in ratios)}: median {statistics.median(ratios):.2f}x"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.channel_ratio", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=64_000)
    args = parser.parse_args(argv)
    for line in asyncio.run(measure(args.rounds, args.events)):
        print(line)


if __name__ == "__main__":
    main()
