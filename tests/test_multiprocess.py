"""Several processes sharing one Postgres log: 4 publishers and 1 subscriber."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from tests.conftest import REDIS_URL, require_redis, unique
from tests.support.postgres_support import ensure_database

PUBLISHERS = 4
PER_PUBLISHER = 100

SUBSCRIBER = """
import asyncio, json, sys
from broadcast_history import Broadcast

async def main(transport, log, channel, count):
    async with Broadcast(transport, log=log) as broadcast:
        async with broadcast.subscribe(channel) as subscriber:
            print("ready", flush=True)
            for _ in range(count):
                event = await subscriber.get()
                print(json.dumps([event.offset, event.message]), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""

PUBLISHER = """
import asyncio, sys
from broadcast_history import Broadcast

async def main(transport, log, channel, name, count):
    async with Broadcast(transport, log=log) as broadcast:
        for i in range(count):
            await broadcast.publish(channel, f"{name}:{i}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
"""


async def _python(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE
    )


@pytest.mark.parametrize("kind", ["redis:pubsub", "postgres:notify"])
async def test_four_publisher_processes_one_subscriber_process(kind: str) -> None:
    database = await ensure_database("bh_test_multiprocess")
    if kind == "redis:pubsub":
        require_redis()
        pytest.importorskip("broadcast_history.backends.redis", reason="redis backend not built")
        transport = REDIS_URL
    else:
        transport = database
    log = database.replace("postgresql://", "postgresql+asyncpg://")
    channel = unique("mp")
    total = PUBLISHERS * PER_PUBLISHER

    subscriber = await _python(SUBSCRIBER, transport, log, channel, str(total))
    publishers: list[asyncio.subprocess.Process] = []
    try:
        assert subscriber.stdout is not None
        ready = await asyncio.wait_for(subscriber.stdout.readline(), 30)
        assert ready == b"ready\n"
        publishers = [
            await _python(PUBLISHER, transport, log, channel, f"p{n}", str(PER_PUBLISHER))
            for n in range(PUBLISHERS)
        ]
        codes = await asyncio.wait_for(
            asyncio.gather(*(process.wait() for process in publishers)), 60
        )
        assert codes == [0] * PUBLISHERS
        output, _ = await asyncio.wait_for(subscriber.communicate(), 30)
        assert subscriber.returncode == 0
    finally:
        for process in [subscriber, *publishers]:
            if process.returncode is None:
                process.kill()
                await process.wait()

    received = [json.loads(line) for line in output.decode().splitlines()]
    assert [offset for offset, _ in received] == list(range(1, total + 1))
    messages = [message for _, message in received]
    assert sorted(messages) == sorted(
        f"p{n}:{i}" for n in range(PUBLISHERS) for i in range(PER_PUBLISHER)
    )
    for n in range(PUBLISHERS):
        mine = [int(m.split(":")[1]) for m in messages if m.startswith(f"p{n}:")]
        assert mine == list(range(PER_PUBLISHER))  # each publisher's order is kept
