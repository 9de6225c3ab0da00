"""A TCP relay whose network can be cut or go silent (fault injection only)."""

from __future__ import annotations

import asyncio
import contextlib


class CuttableProxy:
    """A TCP relay to a service whose network can be cut or stalled."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.is_cut = host, port, False
        self.links: set[asyncio.StreamWriter] = set()
        # Links open when stall() ran: they stay open and carry nothing, a network
        # gone silent (no reset); later connections pass.
        self.stalled: set[asyncio.StreamWriter] = set()
        # Whether new connections go silent too (a frozen server: the kernel still
        # accepts them).
        self.silent = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def stall(self, *, new_too: bool = False) -> None:
        self.stalled |= self.links
        self.silent = new_too

    def resume(self) -> None:
        """New connections pass again; those stalled stay silent (lost for good)."""
        self.silent = False

    def cut(self) -> None:
        self.is_cut = True
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.links |= {writer, up_writer}
        if self.silent:
            self.stalled |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if dst in self.stalled or writer in self.stalled:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
