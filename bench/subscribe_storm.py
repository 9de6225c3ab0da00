"""How long many subscriptions opened at once take: clients reconnecting after a restart.

``python -m bench.subscribe_storm [--transport URL] [--log URL] [SUBSCRIPTIONS]`` opens
SUBSCRIPTIONS subscriptions (2,000 by default) to channels of their own, all at once,
on one broadcast, and prints how long they took and how many lookups of a channel's
head went to the log (as queries: one name alone, or up to 500 together). The log is
a fresh SQLite file unless ``--log`` names another.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from broadcast_history import Broadcast


async def run(transport: str, log: str | None, subscriptions: int) -> str:
    with tempfile.TemporaryDirectory(prefix="bh-subscribe-storm-") as directory:
        log = log or f"sqlite+aiosqlite:///{Path(directory) / 'events.db'}"
        async with Broadcast(transport, log=log) as broadcast, AsyncExitStack() as stack:
            queries = 0
            one, named = broadcast.log.channel, broadcast.log.channels_named

            async def channel(name: str) -> Any:
                nonlocal queries
                queries += 1
                return await one(name)

            async def channels_named(names: list[str]) -> Any:
                nonlocal queries
                queries += 1
                return await named(names)

            broadcast.log.channel = channel  # type: ignore[method-assign]
            broadcast.log.channels_named = channels_named  # type: ignore[method-assign]
            prefix = f"storm-{time.time_ns()}-"
            began = time.perf_counter()
            await asyncio.gather(
                *(
                    stack.enter_async_context(broadcast.subscribe(f"{prefix}{i}"))
                    for i in range(subscriptions)
                )
            )
            took = time.perf_counter() - began
    return f"{subscriptions} subscriptions in {took:.2f} s; {queries} head lookup queries"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subscriptions", nargs="?", type=int, default=2000)
    parser.add_argument("--transport", default="memory://")
    parser.add_argument("--log", default=None)
    args = parser.parse_args()
    print(asyncio.run(run(args.transport, args.log, args.subscriptions)))


if __name__ == "__main__":
    main()
