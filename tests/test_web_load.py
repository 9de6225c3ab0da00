"""The streaming app under many, slow and killed clients, served by a process of its own.

The server (``tests/support/web_server.py``) reports its live subscriptions, open
streams, RSS and open files at ``/stats``; the clients are plain sockets
(``bench/sse_clients.py``). Its subscribers have small budgets (1 MiB of live events,
256 KiB replay pages) so that what a slow client may hold is easy to see.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.sse_clients import SSEClient
from tests.support.ports import free_port

BUFFER_BYTES = 1024 * 1024
PAGE_BYTES = 256 * 1024


class Server:
    def __init__(self, base: str, process: subprocess.Popen[bytes], log: str, errors: Path):
        self.base = base
        self.process = process
        self.log = log
        self.errors = errors  # the server's stderr

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.base}/stats", timeout=10).json()
        return stats

    async def settle(
        self, subscriptions: int, sockets: int | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Stats once the server has ``subscriptions`` live subscriptions (and at most
        ``sockets`` open sockets: closed ones take a moment to be reaped)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                stats: dict[str, Any] = (await http.get(f"{self.base}/stats")).json()
                settled = stats["subscriptions"] == subscriptions
                settled = settled and (sockets is None or stats["sockets"] <= sockets)
                if settled or time.monotonic() > deadline:
                    return stats
                await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    directory = tmp_path_factory.mktemp("load")
    log = f"sqlite+aiosqlite:///{directory / 'load.db'}"
    command = [sys.executable, "-m", "tests.support.web_server", "--port", str(port)]
    command += ["--log", log, "--buffer-bytes", str(BUFFER_BYTES), "--page-bytes", str(PAGE_BYTES)]
    errors = directory / "stderr.txt"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=Path(__file__).parents[1], stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/stats")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        yield Server(base, process, log, errors)
    finally:
        process.terminate()
        process.wait(10)
        sys.stderr.write(errors.read_text(errors="replace"))


async def read_messages(client: SSEClient, count: int) -> list[str]:
    """Ids of the next ``count`` messages."""
    found: list[str] = []
    async for frame in client.frames():
        if frame.get("event") == "message":
            found.append(frame["id"])
            if len(found) == count:
                break
    return found


async def fan_out(server: Server, channel: str, clients: int, events: int) -> dict[str, Any]:
    """``clients`` streams get ``events`` events each, in order; stats while open."""
    streams = [SSEClient(f"{server.base}/events/{channel}") for _ in range(clients)]
    await asyncio.gather(*(stream.connect() for stream in streams))
    try:
        # Each stream was subscribed before its response started.
        readers = [asyncio.ensure_future(read_messages(s, events)) for s in streams]
        async with httpx.AsyncClient(base_url=server.base) as http:
            text = {"content-type": "text/plain"}
            sent = [
                (await http.post(f"/events/{channel}", content=f"m{i}", headers=text)).json()["id"]
                for i in range(events)
            ]
        received = await asyncio.wait_for(asyncio.gather(*readers), 30)
        assert all(ids == sent for ids in received), "a client missed or repeated an event"
        return await server.settle(clients)
    finally:
        for stream in streams:
            stream.close()


async def test_200_clients_get_every_event_and_leave_nothing_behind(server: Server) -> None:
    await fan_out(server, "warm", 200, 20)  # allocator arenas, imports, pooled connections
    before = await server.settle(0)
    open_ = await fan_out(server, "fan", 200, 20)
    assert (open_["subscriptions"], open_["streams"]) == (200, 200)
    after = await server.settle(0, sockets=before["sockets"])
    assert (after["subscriptions"], after["streams"]) == (0, 0)
    # Sockets exactly, and every other file but the log's: its pool may have opened
    # connections meanwhile (each holds the database and its WAL open; a run under
    # load opened two).
    assert after["sockets"] == before["sockets"]
    path = server.log.split("///", 1)[1]
    assert [f for f in after["files"] if not f.startswith(path)] == [
        f for f in before["files"] if not f.startswith(path)
    ]
    # Within 2 MB of where it was (allocator noise), after ~2 MB more for 200 streams.
    assert after["rss_kb"] - before["rss_kb"] < 2048, (before, open_, after)
    print(
        f"\n200 SSE clients: RSS {before['rss_kb']} kB idle, {open_['rss_kb']} kB with them, "
        f"{after['rss_kb']} kB after; fds {before['fds']} / {open_['fds']} / {after['fds']}, "
        f"sockets {before['sockets']} / {open_['sockets']} / {after['sockets']}"
    )


async def test_slow_readers_hold_no_more_than_their_budget(server: Server) -> None:
    before = await server.settle(0)
    # Two clients that stop reading at once: a 4 KiB receive buffer, never drained.
    slow = [SSEClient(f"{server.base}/events/slow", receive_buffer=4096) for _ in range(2)]
    await asyncio.gather(*(client.connect() for client in slow))
    message = "x" * (64 * 1024)
    count = 512  # 32 MiB published while they do not read
    peak = 0
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
        for i in range(count):
            await http.post("/events/slow", content=message, headers={"content-type": "text/plain"})
            if i % 20 == 0:
                peak = max(peak, (await http.get("/stats")).json()["rss_kb"])
    grown = peak - before["rss_kb"]
    # Each holds at most its live buffer (1 MiB, messages shared between them) and a
    # replay page (256 KiB), plus the server's send buffer; not the 32 MiB published.
    assert grown < 10 * 1024, f"server RSS grew {grown} kB for 2 stalled readers"
    # Then they read, from the log, everything: nothing was lost to the budget.
    received = await asyncio.wait_for(
        asyncio.gather(*(read_messages(client, count) for client in slow)), 60
    )
    for ids in received:
        assert [int(i.split(":")[1]) for i in ids] == list(range(1, count + 1))
    for client in slow:
        client.close()
    assert (await server.settle(0))["subscriptions"] == 0
    print(f"\n2 stalled readers, 32 MiB published: server RSS +{grown} kB at most")


KILLED_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    from websockets.sync.client import connect
    port = int(sys.argv[1])
    keep = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /events/killed HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        keep.append(sock)
        keep.append(connect(f"ws://127.0.0.1:{port}/events/killed/ws"))
    print("ready", flush=True)
    time.sleep(60)
    """
)


async def test_killed_clients_end_their_subscriptions(server: Server) -> None:
    before = await server.settle(0)
    port = server.base.rsplit(":", 1)[1]
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, port], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        assert (await server.settle(40))["subscriptions"] == 40
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
        began = time.monotonic()
        after = await server.settle(0)
        assert after["subscriptions"] == 0, after
        assert time.monotonic() - began < 2  # at once, not at the next keepalive
        after = await server.settle(0, sockets=before["sockets"])
        assert after["sockets"] == before["sockets"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_client_leaving_mid_replay_is_noticed_at_once(
    server: Server, transport: str
) -> None:
    """A stream replaying pages already in memory wrote frame after frame without
    letting the loop run: the server noticed the client had gone only at the end of
    the page, and asyncio logged "socket.send() raised exception." for each frame
    written meanwhile (hundreds per disconnect)."""
    from broadcast_history import Broadcast

    channel = f"replay-leave-{transport}-{time.monotonic_ns()}"
    async with Broadcast(log=server.log) as publisher:
        for start in range(0, 3000, 500):
            await asyncio.gather(
                *(publisher.publish(channel, f"m{i}" * 20) for i in range(start, start + 500))
            )
    before = server.errors.read_text(errors="replace").count("socket.send() raised")
    host, port = server.base.removeprefix("http://").split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        if transport == "sse":
            request = f"GET /events/{channel}?since=0 HTTP/1.1\r\nHost: x\r\n\r\n"
        else:
            request = (
                f"GET /events/{channel}/ws?since=0 HTTP/1.1\r\nHost: x\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
        writer.write(request.encode())
        await reader.readexactly(2000)  # replay under way
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset: writes to it fail at once
        await asyncio.sleep(0.3)
    assert (await server.settle(0))["subscriptions"] == 0
    after = server.errors.read_text(errors="replace").count("socket.send() raised")
    assert after - before == 0


def test_the_fan_out_benchmark_runs(tmp_path: Path) -> None:
    from bench import web_fanout

    out = tmp_path / "web.json"
    figures = web_fanout.main(["--clients", "20", "--events", "10", "--out", str(out)])
    assert figures["delivered_per_s"] > 0
    assert json.loads(out.read_text())["clients"] == 20
