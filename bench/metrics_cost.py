"""CPU per published event with Prometheus metrics on and off (memory + SQLite file).

``python -m bench.metrics_cost``: 64 tasks publish 20,000 events of 99 characters
while one subscriber reads them, five times each way, interleaved; prints the median
CPU time per event (process time, so other load on the machine matters less than it
does for rates) and the rate.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

from prometheus_client import CollectorRegistry

from broadcast_history import Broadcast


async def run(metrics: bool, n: int = 20_000) -> tuple[float, float]:
    """(CPU microseconds per event, events per second) of one run."""
    directory = tempfile.mkdtemp()
    registry = CollectorRegistry() if metrics else False
    broadcast = Broadcast(
        "memory://", log=f"sqlite+aiosqlite:///{directory}/e.db", metrics=registry
    )
    per = n // 64
    async with broadcast, broadcast.subscribe("c") as sub:

        async def reader() -> None:
            for _ in range(per * 64 + 200):
                await sub.get()

        reading = asyncio.create_task(reader())
        await asyncio.gather(*[broadcast.publish("c", "x" * 99) for _ in range(200)])
        cpu, wall = time.process_time(), time.perf_counter()

        async def publisher() -> None:
            for _ in range(per):
                await broadcast.publish("c", "x" * 99)

        await asyncio.gather(*[publisher() for _ in range(64)])
        await reading
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / (per * 64) * 1e6, per * 64 / wall


async def main() -> None:
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(5):
        for metrics in (False, True):
            results[metrics].append(await run(metrics))
    for metrics in (False, True):
        cpus = sorted(c for c, _ in results[metrics])
        rates = sorted(r for _, r in results[metrics])
        name = "metrics on " if metrics else "metrics off"
        print(
            f"{name}: {cpus[2]:.2f} us CPU/event (min {cpus[0]:.2f}, max {cpus[-1]:.2f}),"
            f" {rates[2]:,.0f} events/s"
        )


if __name__ == "__main__":
    asyncio.run(main())
