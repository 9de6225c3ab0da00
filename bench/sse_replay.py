"""SSE catch-up: one client replays a channel's history through the streaming app.

``python -m bench.sse_replay [--events 30000] [--rounds 5]``

A SQLite file log gets ``--events`` events of one channel; the server process
(``bench/web_server.py``: uvicorn, one process, ``create_stream_app``) serves it, and
one client on a plain socket asks for ``?since=0`` and reads until the last event's
``id:`` line, ``--rounds`` times in a row. Prints the events per second of each round.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broadcast_history import Broadcast

from .configs import ROOT, free_port


async def fill(log: str, events: int) -> None:
    async with Broadcast(log=log) as broadcast:
        for start in range(0, events, 1000):
            stop = min(start + 1000, events)
            await asyncio.gather(
                *(broadcast.publish("replay", f"message {i:08d}") for i in range(start, stop))
            )


async def replay(port: int, events: int) -> float:
    """Events per second of one full catch-up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /replay?since=0 HTTP/1.1\r\nHost: bench\r\n\r\n")
        began = time.perf_counter()
        seen = 0
        while seen < events:
            line = await reader.readline()
            if not line:
                raise RuntimeError("the server ended the stream")
            seen += line.startswith(b"id:")
        return events / (time.perf_counter() - began)
    finally:
        writer.close()


async def main(events: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        log = f"sqlite+aiosqlite:///{Path(directory) / 'events.db'}"
        await fill(log, events)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.web_server", "--port", str(port), "--log", log],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:  # until the server accepts connections
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    await asyncio.sleep(0.05)
            rates = [await replay(port, events) for _ in range(rounds)]
            await asyncio.sleep(0.5)  # the server sees the last client leave
        finally:
            server.terminate()
            server.wait(10)
    print(f"SSE catch-up of {events:,} events, {rounds} rounds (events/s):")
    print("  " + "  ".join(f"{rate:,.0f}" for rate in rates))
    print(f"  median {sorted(rates)[len(rates) // 2]:,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(main(options.events, options.rounds))
