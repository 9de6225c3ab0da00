"""A fault-injecting TCP proxy: one process per host, switched at run time.

``python -m lab.proxy --control SOCKET --route LISTEN=UPSTREAM ...`` forwards each
``host:port`` it listens on to its upstream. A host reaches every service through its
own proxy, so a fault set there touches that host's connections only. Commands arrive
as JSON lines on the Unix socket ``SOCKET``; each is answered ``{"ok": true}``:

* ``{"delay": 0.05}``: every chunk is forwarded that many seconds after it was read,
  in each direction (a round trip takes twice as long more); order is kept.
* ``{"stall": true}`` / ``{"stall": false}``: hold every byte (then, once a small
  queue is full, stop reading, so the senders' TCP windows fill) / let them go.
* ``{"sever": true}``: abort every open connection (the peers see a reset).

(The kernel here has no ``netem``; this is the lab's substitute for it.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
from typing import Any

_CHUNK = 65536
_QUEUED_CHUNKS = 32


class Faults:
    """The current faults, shared by every connection of the proxy."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.links: set[asyncio.Task[None]] = set()

    def apply(self, command: dict[str, Any]) -> None:
        if "delay" in command:
            self.delay = float(command["delay"])
        if "stall" in command:
            if command["stall"]:
                self.flowing.clear()
            else:
                self.flowing.set()
        if command.get("sever"):
            for task in list(self.links):
                task.cancel()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faults: Faults) -> None:
    """Copy one direction, each chunk delayed and held as the faults say."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUED_CHUNKS)

    async def read() -> None:
        try:
            while data := await reader.read(_CHUNK):
                await queue.put((loop.time() + faults.delay, data))
        finally:
            await queue.put(None)

    reading = asyncio.create_task(read())
    try:
        while (item := await queue.get()) is not None:
            due, data = item
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await faults.flowing.wait()
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


async def _link(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    faults: Faults,
) -> None:
    server_writer: asyncio.StreamWriter | None = None
    try:
        server_reader, server_writer = await asyncio.open_connection(*upstream)
        pumps = [
            asyncio.create_task(_pump(client_reader, server_writer, faults)),
            asyncio.create_task(_pump(server_reader, client_writer, faults)),
        ]
        try:
            # Either side closing (after what it sent was passed on) ends the link.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    except (OSError, asyncio.CancelledError):
        # Severed, or an end vanished: reset both sides rather than close politely.
        for writer in (client_writer, server_writer):
            if writer is not None:
                writer.transport.abort()
    finally:
        for writer in (client_writer, server_writer):
            if writer is not None:
                writer.close()


async def _control(path: str, faults: Faults) -> asyncio.AbstractServer:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                faults.apply(json.loads(line))
                writer.write(b'{"ok": true}\n')
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, path)


async def _serve(routes: list[tuple[str, int, str, int]], control: str) -> None:
    faults = Faults()

    def accept(upstream: tuple[str, int]) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.current_task()
            assert task is not None
            faults.links.add(task)
            try:
                await _link(reader, writer, upstream, faults)
            finally:
                faults.links.discard(task)

        return handle

    servers = [await _control(control, faults)]
    for host, port, up_host, up_port in routes:
        servers.append(await asyncio.start_server(accept((up_host, up_port)), host, port))
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def _route(text: str) -> tuple[str, int, str, int]:
    listen, _, upstream = text.partition("=")
    host, _, port = listen.rpartition(":")
    up_host, _, up_port = upstream.rpartition(":")
    return host, int(port), up_host, int(up_port)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.proxy")
    parser.add_argument("--control", required=True, help="Unix socket for fault commands")
    parser.add_argument("--route", action="append", type=_route, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.route, args.control))


class ProxyControl:
    """The lab's side of a proxy's control socket (blocking; each call is short)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, **command: Any) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall(json.dumps(command).encode() + b"\n")
            if not sock.makefile("rb").readline().startswith(b'{"ok"'):
                raise RuntimeError(f"proxy {self.path} refused {command}")


if __name__ == "__main__":
    main()
