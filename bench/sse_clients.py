"""Many Server-Sent Events clients in one process, over plain asyncio sockets.

httpx or a browser cost far more per connection than the server under test; these
read a stream with a few lines of parsing, so a thousand of them fit in one process.
Used by the web fan-out benchmark and by the load tests of the streaming app.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class StreamError(Exception):
    """The server did not answer with an event stream."""


class SSEClient:
    """One event stream over HTTP/1.1 (chunked, as uvicorn sends it).

    Args:
        url: ``http://host:port/path?query`` of the stream.
        headers: Extra request headers (``Last-Event-ID``...).
        receive_buffer: ``SO_RCVBUF`` in bytes (small: a client that reads slowly).
    """

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, receive_buffer: int | None = None
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = headers or {}
        self.receive_buffer = receive_buffer
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Send the request and read the response head; raises unless it is a stream."""
        sock = socket.socket()
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=2**22)
        lines = [f"GET {self.target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"text/event-stream" not in head:
            raise StreamError(head.split(b"\r\n", 1)[0].decode())

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoding only)."""
        reader = self.reader
        assert reader is not None
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def frames(self) -> AsyncIterator[dict[str, str]]:
        """Each frame as ``{field: value}`` (``data`` lines joined by newlines);
        comments are skipped."""
        buffer = b""
        async for chunk in self.chunks():
            buffer += chunk.replace(b"\r\n", b"\n")  # either line end is allowed
            *complete, buffer = buffer.split(b"\n\n")
            for block in complete:
                fields: dict[str, str] = {}
                for line in block.decode().split("\n"):
                    if not line or line.startswith(":"):
                        continue
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data" and "data" in fields:
                        value = fields["data"] + "\n" + value
                    fields[name] = value
                if fields:
                    yield fields

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
