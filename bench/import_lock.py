"""How long publishers wait while an export is imported into a SQLite file log.

``python -m bench.import_lock [EVENTS]`` imports EVENTS events of 100 bytes (one
channel, 1,000,000 by default) with ``HistoryAdmin.import_jsonl`` from a list of
lines, into a fresh file log, while another task publishes on another channel every
10 ms, and prints the import's time and the publishes' longest and p99 waits. On
SQLite the write lock is the whole file's: the longest wait is about how long the
import held it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from broadcast_history import Broadcast
from broadcast_history.admin import HistoryAdmin


def _lines(events: int) -> Iterator[str]:
    yield json.dumps(
        {"type": "channel", "name": "big", "epoch": 7, "first_offset": 1, "last_offset": events}
    )
    for offset in range(1, events + 1):
        event = {"type": "event", "channel": "big", "offset": offset, "epoch": 7}
        event.update(timestamp="2024-01-01T00:00:00+00:00", key=None, encoding="text")
        yield json.dumps({**event, "message": "x" * 100})
    yield json.dumps({"type": "end", "format": 2, "channels": 1, "events": events})


async def run(events: int) -> str:
    with tempfile.TemporaryDirectory(prefix="bh-import-lock-") as directory:
        log = f"sqlite+aiosqlite:///{Path(directory) / 'events.db'}"
        async with Broadcast(log=log) as broadcast:
            waits: list[float] = []
            importing = True

            async def publisher() -> None:
                while importing:
                    began = time.perf_counter()
                    await broadcast.publish("live", "y")
                    waits.append(time.perf_counter() - began)
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(publisher())
            began = time.perf_counter()
            await HistoryAdmin.of(broadcast).import_jsonl(_lines(events))
            took = time.perf_counter() - began
            importing = False
            await task
    waits.sort()
    return (
        f"import {took:.1f} s; publishes {len(waits)}, longest wait {waits[-1]:.2f} s, "
        f"p99 {waits[int(len(waits) * 0.99)]:.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="?", type=int, default=1_000_000)
    print(asyncio.run(run(parser.parse_args().events)))


if __name__ == "__main__":
    main()
