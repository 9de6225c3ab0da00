"""SSE fan-out: 1 publisher, N Server-Sent Events clients, one server process.

``python -m bench.web_fanout [--clients 1000] [--events 300] [--rate 0] [--impl ours]``

The server (``bench/web_server.py``: uvicorn, one process, memory transport, SQLite
file log) serves ``create_stream_app``. This process opens the clients
(``bench/sse_clients.py``), waits until each has its stream's first frame (sent once
it is subscribed), then publishes ``--events`` messages with ``POST`` on one
keep-alive connection, each awaited: back to back (``--rate 0``) or paced at
``--rate`` per second. Each message carries its send time; 20 of the clients parse
every frame for latency (send → received, including the POST and the commit), the
others count frames. Results: ``delivered_per_s`` (events x clients over the time
from the first publish to the last delivery), latency p50/p99/max, the server's RSS.
Clients and publisher share one process and one core: at saturation the client side
adds to the latency it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .configs import OUT, ROOT, free_port
from .scenarios import percentile
from .sse_clients import SSEClient

SAMPLED = 20
PAYLOAD = "x" * 60


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _count(client: SSEClient, events: int, done: asyncio.Future[float]) -> None:
    """Count message frames until ``events``; resolves ``done`` with the arrival time."""
    seen = 0
    async for chunk in client.chunks():
        seen += chunk.count(b"event: message")
        if seen >= events:
            done.set_result(time.monotonic())
            return


async def _sample(
    client: SSEClient, events: int, latencies: list[float], done: asyncio.Future[float]
) -> None:
    seen = 0
    async for frame in client.frames():
        if frame.get("event") != "message":
            continue
        latencies.append(time.monotonic() - float(frame["data"].split(" ", 1)[0]))
        seen += 1
        if seen >= events:
            done.set_result(time.monotonic())
            return


async def _ready(client: SSEClient) -> None:
    await client.connect()
    # The first frame (retry:) comes once the server has subscribed this stream.
    async for _ in client.chunks():
        return


async def run(base: str, clients: int, events: int, rate: float) -> dict[str, Any]:
    channel = f"fanout-{uuid.uuid4().hex[:8]}"
    streams = [SSEClient(f"{base}/{channel}") for _ in range(clients)]
    connect_began = time.monotonic()
    for start in range(0, clients, 200):  # not all at once: the listen backlog
        await asyncio.gather(*(_ready(s) for s in streams[start : start + 200]))
    connect_s = time.monotonic() - connect_began
    loop = asyncio.get_running_loop()
    finished = [loop.create_future() for _ in streams]
    latencies: list[float] = []
    readers = [
        asyncio.ensure_future(
            _sample(s, events, latencies, f) if i < SAMPLED else _count(s, events, f)
        )
        for i, (s, f) in enumerate(zip(streams, finished, strict=True))
    ]
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        began = time.monotonic()
        for index in range(events):
            if rate:
                await asyncio.sleep(max(0.0, began + index / rate - time.monotonic()))
            body = f"{time.monotonic()!r} {index} {PAYLOAD}"
            answer = await http.post(
                f"/{channel}", content=body, headers={"content-type": "text/plain"}
            )
            answer.raise_for_status()
        published_s = time.monotonic() - began
    last = max(await asyncio.wait_for(asyncio.gather(*finished), 300))
    for reader in readers:
        reader.cancel()
    for stream in streams:
        stream.close()
    elapsed = last - began
    ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": clients,
        "events": events,
        "rate": rate,
        "connect_s": round(connect_s, 2),
        "publish_rate": round(events / published_s, 1),
        "delivered_per_s": round(clients * events / elapsed),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.web_fanout", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: back to back")
    parser.add_argument("--impl", choices=["ours", "sse-starlette"], default="ours")
    parser.add_argument(
        "--fast", action="store_true", help="serve with uvloop and httptools (uvicorn[standard])"
    )
    parser.add_argument("--out", default=str(OUT / "web_fanout.json"))
    args = parser.parse_args(argv)
    # Stopped with SIGTERM: still run the finally below, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (OUT / "tmp").mkdir(parents=True, exist_ok=True)
    db = OUT / "tmp" / f"web-{uuid.uuid4().hex}.db"
    port = free_port()
    command = [sys.executable, "-m", "bench.web_server", "--port", str(port)]
    command += ["--log", f"sqlite+aiosqlite:///{db}", "--impl", args.impl]
    if args.fast:
        command += ["--http", "httptools", "--loop", "uvloop"]
    server = subprocess.Popen(command, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(f"{base}/warm-up", content="x")
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the benchmark server did not start") from None
                time.sleep(0.1)
        rss_idle = _server_rss_kb(server.pid)
        cpu = _cpu_s(server.pid), time.process_time()
        result = asyncio.run(run(base, args.clients, args.events, args.rate))
        deliveries = args.clients * args.events
        # CPU per delivery, connections included: where the time goes on a busy machine.
        result["server_us_per_delivery"] = round(
            (_cpu_s(server.pid) - cpu[0]) / deliveries * 1e6, 1
        )
        result["client_us_per_delivery"] = round(
            (time.process_time() - cpu[1]) / deliveries * 1e6, 1
        )
        result["impl"] = args.impl
        result["server"] = "uvloop+httptools" if args.fast else "asyncio+h11"
        result["server_rss_mb_idle"] = round(rss_idle / 1024, 1)
        result["server_rss_mb_after"] = round(_server_rss_kb(server.pid) / 1024, 1)
    finally:
        server.terminate()
        server.wait(30)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
