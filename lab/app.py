"""The app on each host: publishers and subscribers using only the public API.

``python -m lab.app publisher NAME --transport URL --log URL --records FILE ...``
publishes ``rate`` messages a second (a few in flight) until ``--until``, round-robin
over the channels. Each message is its own id, also passed as ``key=``: a publish
that raised is retried with the same key until it returns (or the run is over), so a
publish that was stored although it raised is found rather than stored twice.

``python -m lab.app subscriber NAME --channel C --start replay|live ...`` reads a
channel until SIGTERM. After ``kill -9`` it is started again and resumes from the
last event it recorded: ``subscribe(channel, since=offset, epoch=epoch)``. An error
from the subscription (the log is down) is recorded and the subscription is entered
again the same way.

Records are JSON lines, one ``os.write`` each, so ``kill -9`` never leaves half a
line. Publisher: ``start``, then per attempt ``try``, and ``ok`` (with the offset and
epoch returned) or ``err``. Subscriber: ``start`` (position entered from), ``ev``
(offset, epoch, message) per event, ``err``, ``stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from broadcast_history import Broadcast, BroadcastError, TransportError

_RETRY = 0.5  # seconds between attempts, after an error


class Records:
    """An append-only JSON-lines file written one line per ``os.write``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"k": kind, "t": round(time.time(), 3), **fields}) + "\n"
        os.write(self._fd, line.encode())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a records file."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line.strip()]


async def _connect(args: argparse.Namespace, records: Records) -> Broadcast:
    """A connected Broadcast; connecting is retried while the servers are down."""
    while True:
        broadcast = Broadcast(args.transport, log=args.log)
        try:
            await broadcast.connect()
            return broadcast
        except BroadcastError as exc:
            records.write("err", where="connect", error=repr(exc))
            await asyncio.sleep(_RETRY)


def _await_go(path: Path) -> float:
    """Block until the runner writes ``path``; the Unix time it holds."""
    while not path.exists():
        time.sleep(0.05)
    return float(path.read_text())


async def publisher(args: argparse.Namespace) -> None:
    path = Path(args.records)
    incarnation = sum(1 for r in read_records(path) if r["k"] == "start")
    records = Records(path)
    records.write("start", inc=incarnation, pid=os.getpid())
    broadcast = await _connect(args, records)
    # Publishing begins when every process of the run is up (the go file holds when
    # it ends): startup takes seconds here, and the fault is timed from the go.
    records.write("ready")
    args.until = await asyncio.to_thread(_await_go, Path(args.go))
    channels = args.channels.split(",")
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(args.inflight)
    tasks: set[asyncio.Task[None]] = set()

    async def publish(channel: str, key: str) -> None:
        try:
            while True:
                records.write("try", ch=channel, id=key)
                try:
                    event = await broadcast.publish(channel, key, key=key)
                except BroadcastError as exc:
                    records.write("err", ch=channel, id=key, error=repr(exc))
                    if time.time() > args.until + args.grace:
                        # Stored once or not at all; still failing is a finding.
                        records.write("gave_up", ch=channel, id=key)
                        return
                    await asyncio.sleep(_RETRY)
                    continue
                except Exception as exc:
                    # None of the library's errors: a defect, whatever was stored. The
                    # task's exception alone went unseen (nobody awaits a finished task).
                    records.write("raised", ch=channel, id=key, error=repr(exc))
                    return
                records.write("ok", ch=channel, id=key, off=event.offset, ep=event.epoch)
                return
        finally:
            slots.release()

    seq = 0
    next_at = loop.time()
    while time.time() < args.until:
        await slots.acquire()
        key = f"{args.name}.{incarnation}.{seq}"
        task = asyncio.create_task(publish(channels[seq % len(channels)], key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        seq += 1
        next_at += 1 / args.rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await asyncio.gather(*tasks)
    await broadcast.disconnect()
    records.write("done", published=seq)


def _resume_point(previous: list[dict[str, Any]], start: str) -> dict[str, Any]:
    """Arguments of ``subscribe`` that continue from what ``previous`` records."""
    for record in reversed(previous):
        if record["k"] == "ev":
            return {"since": record["off"], "epoch": record["ep"]}
    for record in previous:
        if record["k"] == "start":  # nothing received yet: from where it first began
            position = {"since": record["pos"]}
            if record["ep"] is not None:
                position["epoch"] = record["ep"]
            return position
    return {"since": 0} if start == "replay" else {}


async def subscriber(args: argparse.Namespace) -> None:
    path = Path(args.records)
    records = Records(path)
    position = _resume_point(read_records(path), args.start)
    stopping = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def stop() -> None:
        stopping.set()
        main.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    broadcast: Broadcast | None = None
    try:
        while True:
            if broadcast is None:
                broadcast = await _connect(args, records)
            try:
                async with broadcast.subscribe(args.channel, **position) as sub:
                    records.write("start", **position, pos=sub.position, ep=sub.epoch)
                    async for event in sub:
                        records.write("ev", off=event.offset, ep=event.epoch, id=event.message)
                        position = {"since": event.offset, "epoch": event.epoch}
            except BroadcastError as exc:
                records.write("err", error=repr(exc), since=position.get("since"))
                if isinstance(exc, TransportError):
                    # The transport gave up for good: a fresh Broadcast, same position.
                    await broadcast.disconnect()
                    broadcast = None
                await asyncio.sleep(_RETRY)
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
    finally:
        if broadcast is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broadcast.disconnect(), 10)
    records.write("stop")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.app")
    parser.add_argument("role", choices=["publisher", "subscriber"])
    parser.add_argument("name")
    parser.add_argument("--transport", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--channels", help="publisher: comma-separated channels")
    parser.add_argument("--rate", type=float, default=10.0, help="publishes per second")
    parser.add_argument("--inflight", type=int, default=4, help="publishes awaited at once")
    parser.add_argument("--go", help="publisher: file that holds the Unix time to stop at")
    parser.add_argument("--grace", type=float, default=30.0, help="retry this long after")
    parser.add_argument("--channel", help="subscriber: the channel")
    parser.add_argument("--start", choices=["replay", "live"], default="replay")
    args = parser.parse_args()
    run = publisher if args.role == "publisher" else subscriber
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
