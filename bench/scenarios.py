"""The scenarios. Each takes a connected broadcast (ours or encode/broadcaster's, both
have ``publish`` and ``subscribe``) and returns its figures for one run."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

from .bigfill import channel_name

Metrics = dict[str, Any]
PAYLOAD = '{"user": "bench", "text": "' + "x" * 40 + '"}'  # 70 bytes, as in big logs
_PAGE = os.sysconf("SC_PAGE_SIZE")


def unique(prefix: str) -> str:
    return f"run-{prefix}-{uuid.uuid4().hex[:10]}"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def message(index: int) -> str:
    return f"{index:09d}" + PAYLOAD


async def _drain(sub: Any, count: int, stamps: list[float] | None = None) -> None:
    received = 0
    async for _event in sub:
        if stamps is not None:
            stamps.append(time.perf_counter())
        received += 1
        if received == count:
            return


async def warm_up(b: Any, count: int = 200) -> None:
    """Open connections, subscriptions and caches before anything is timed."""
    channel = unique("warm")
    async with b.subscribe(channel) as sub:
        reader = asyncio.create_task(_drain(sub, count))
        for index in range(count):
            await b.publish(channel, message(index))
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 30)


async def sequential(b: Any, n: int) -> Metrics:
    """One publisher awaiting each publish, one subscriber: rate and latency."""
    await warm_up(b)
    channel = unique("seq")
    sent: list[float] = []
    received: list[float] = []
    async with b.subscribe(channel) as sub:
        reader = asyncio.create_task(_drain(sub, n, received))
        began = time.perf_counter()
        for index in range(n):
            sent.append(time.perf_counter())
            await b.publish(channel, message(index))
            # broadcaster's memory publish never yields: let the subscriber run, as
            # any real application would between two awaited publishes.
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 120)
    latencies = [(r - s) * 1000 for s, r in zip(sent, received, strict=True)]
    return {
        "rate": n / (received[-1] - began),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


async def concurrent(b: Any, n: int, channels: int, publishers: int = 64) -> Metrics:
    """``publishers`` tasks awaiting each publish, one subscriber per channel."""
    await warm_up(b)
    names = [unique("conc") for _ in range(channels)]
    # All n events, split as evenly as 64 tasks allow (as bench.plain_api does).
    base, extra = divmod(n, publishers)
    shares = [base + (p < extra) for p in range(publishers)]
    total = n
    expected = dict.fromkeys(names, 0)
    for p in range(publishers):
        for k in range(shares[p]):
            expected[names[(p + k) % channels]] += 1

    async def publisher(p: int) -> None:
        for k in range(shares[p]):
            await b.publish(names[(p + k) % channels], message(k))

    async with AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(b.subscribe(name)) for name in names]
        readers = [
            asyncio.create_task(_drain(sub, expected[name]))
            for sub, name in zip(subs, names, strict=True)
            if expected[name]
        ]
        began = time.perf_counter()
        await asyncio.gather(*(publisher(p) for p in range(publishers)))
        await asyncio.wait_for(asyncio.gather(*readers), 300)
        elapsed = time.perf_counter() - began
    return {"rate": total / elapsed}


async def fanout(b: Any, n: int, subscribers: int = 1000, window: int = 100) -> Metrics:
    """One publisher (``window`` publishes in flight), ``subscribers`` on one channel."""
    await warm_up(b)
    channel = unique("fan")
    sent: dict[int, float] = {}
    latencies: list[float] = []
    sampled = 10

    async def reader(sub: Any, sample: bool) -> None:
        received = 0
        async for event in sub:
            if sample:
                index = int(event.message[:9])
                latencies.append((time.perf_counter() - sent[index]) * 1000)
            received += 1
            if received == n:
                return

    async with AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(b.subscribe(channel)) for _ in range(subscribers)]
        readers = [asyncio.create_task(reader(sub, i < sampled)) for i, sub in enumerate(subs)]
        began = time.perf_counter()
        for start in range(0, n, window):
            batch = range(start, min(n, start + window))
            now = time.perf_counter()
            for index in batch:
                sent[index] = now
            await asyncio.gather(*(b.publish(channel, message(i)) for i in batch))
        await asyncio.wait_for(asyncio.gather(*readers), 300)
        elapsed = time.perf_counter() - began
    return {"rate": n * subscribers / elapsed, "p99_ms": percentile(latencies, 99)}


async def replay(b: Any, size: int) -> Metrics:
    """``subscribe(since=0)`` over a log of ``size`` events, into ``async for``."""
    channel = channel_name(size)
    began = time.perf_counter()
    count = 0
    async with b.subscribe(channel, since=0) as sub:
        async for event in sub:
            count += 1
            if event.offset == size:
                break
    elapsed = time.perf_counter() - began
    if count != size:
        raise RuntimeError(f"replayed {count} of {size} events")
    return {"rate": size / elapsed}


async def first_event(b: Any, size: int, samples: int = 20) -> Metrics:
    """Time to the first event when subscribing from the middle of a ``size`` log."""
    channel = channel_name(size)
    times: list[float] = []
    rng = random.Random(size)
    for _ in range(samples):
        since = size // 2 + rng.randrange(-size // 10, size // 10)
        began = time.perf_counter()
        async with b.subscribe(channel, since=since) as sub:
            event = await sub.get()
            times.append((time.perf_counter() - began) * 1000)
        if event.offset != since + 1:
            raise RuntimeError(f"first event {event.offset}, expected {since + 1}")
    return {"p50_ms": percentile(times, 50), "max_ms": max(times)}


async def catch_up(
    b: Any,
    preload: int,
    duration: float,
    subscribers: int = 100,
    rate: int = 2000,
) -> Metrics:
    """Subscribers reconnecting at random offsets while ``rate`` events/s are published.

    Every event a subscriber receives is checked against the offset it expects: a
    higher one is a gap, a lower one a duplicate.
    """
    channel = unique("catch")
    head = 0
    for start in range(0, preload, 500):
        events = await asyncio.gather(
            *(b.publish(channel, message(i)) for i in range(start, min(preload, start + 500)))
        )
        head = max(head, max(e.offset for e in events))
    stop = asyncio.Event()
    published = 0
    tick = 0.01
    per_tick = max(1, int(rate * tick))

    async def publisher() -> None:
        nonlocal head, published
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        # Until every subscriber left: one waiting for live events must get them.
        while not stop.is_set() or active:
            events = await asyncio.gather(
                *(b.publish(channel, message(i)) for i in range(per_tick))
            )
            published += len(events)
            head = max(head, max(e.offset for e in events))
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    times: list[float] = []
    checked = gaps = duplicates = 0
    rng = random.Random(7)

    active = subscribers

    async def subscriber() -> None:
        nonlocal active
        try:
            await _reconnect_loop()
        finally:
            active -= 1

    async def _reconnect_loop() -> None:
        nonlocal checked, gaps, duplicates
        while not stop.is_set():
            since = rng.randint(0, head)
            began = time.perf_counter()
            async with b.subscribe(channel, since=since) as sub:
                target = head
                expected = since + 1
                caught_up = False
                async for event in sub:
                    checked += 1
                    if event.offset > expected:
                        gaps += 1
                    elif event.offset < expected:
                        duplicates += 1
                    expected = event.offset + 1
                    if not caught_up and event.offset >= target:
                        times.append(time.perf_counter() - began)
                        caught_up = True
                        # Stay a little while live, across the handoff.
                        target = head + 20
                    elif caught_up and event.offset >= target:
                        break
            # A client's reconnect delay; also leaves the publisher its share of CPU.
            await asyncio.sleep(rng.uniform(0.0, 0.5))

    pub = asyncio.create_task(publisher())
    began = time.perf_counter()
    subs = [asyncio.create_task(subscriber()) for _ in range(subscribers)]
    await asyncio.sleep(duration)
    stop.set()
    await asyncio.wait_for(asyncio.gather(pub, *subs), 120)
    elapsed = time.perf_counter() - began
    return {
        "catchup_p50_s": percentile(times, 50),
        "catchup_max_s": max(times) if times else float("nan"),
        "reconnects": len(times),
        "checked": checked,
        "gaps": gaps,
        "duplicates": duplicates,
        "publish_rate": published / elapsed,
    }


async def memory_subscribers(b: Any, subscribers: int = 10_000, channels: int = 1000) -> Metrics:
    """RSS growth with ``subscribers`` live subscriptions over ``channels`` channels."""
    await warm_up(b)
    names = [unique("mem") for _ in range(channels)]
    gc.collect()
    before = rss_mb()
    async with AsyncExitStack() as stack:
        subs = [
            await stack.enter_async_context(b.subscribe(names[i % channels]))
            for i in range(subscribers)
        ]
        for name in names:
            await b.publish(name, message(0))
        await asyncio.wait_for(asyncio.gather(*(sub.get() for sub in subs)), 120)
        gc.collect()
        after = rss_mb()
    return {"rss_mb": after - before, "kb_per_sub": (after - before) * 1024 / subscribers}


async def stalled(b: Any, n: int, publishers: int = 64) -> Metrics:
    """Extra RSS while ``n`` events go to a channel whose one subscriber never reads."""
    await warm_up(b, 2000)
    channel = unique("stall")
    gc.collect()
    base = rss_mb()
    peak = base
    done = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb())
            await asyncio.sleep(0.05)

    per = n // publishers

    async def publisher() -> None:
        for k in range(per):
            await b.publish(channel, message(k))

    async with b.subscribe(channel):
        watch = asyncio.create_task(sampler())
        began = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(publishers)))
        elapsed = time.perf_counter() - began
        await asyncio.sleep(0.5)  # let the transport deliver what is in flight
        peak = max(peak, rss_mb())
        done.set()
        await watch
    return {"extra_mb": peak - base, "events": per * publishers, "rate": per * publishers / elapsed}


async def transport_publish(b: Any, n: int, channels: int, batch: int = 100) -> Metrics:
    """The live transport alone, without the log: ``n`` messages sent with
    ``publish_many`` (``batch`` at a time, spread over ``channels`` channels) by one
    connection and received by another. A transport may drop messages; the run ends
    when all have arrived or none came for two seconds, and reports what was lost."""
    from broadcast_history.backends import backend_from_url

    url = b.backend._url
    sender = backend_from_url(url)
    # The memory transport reaches its own instance only.
    receiver = sender if url.startswith("memory") else backend_from_url(url)
    names = [unique("transport") for _ in range(channels)]
    await sender.connect()
    await receiver.connect()
    try:
        for name in names:
            await receiver.subscribe(name)
        received = 0
        last = time.perf_counter()

        async def receive() -> None:
            nonlocal received, last
            while received < n:
                try:
                    await asyncio.wait_for(receiver.next_published(), 2.0)
                except asyncio.TimeoutError:
                    return
                received += 1
                last = time.perf_counter()

        reader = asyncio.create_task(receive())
        began = time.perf_counter()
        for start in range(0, n, batch):
            await sender.publish_many(
                [(names[i % channels], message(i)) for i in range(start, min(n, start + batch))]
            )
        sent = time.perf_counter()
        await reader
    finally:
        await sender.disconnect()
        if receiver is not sender:
            await receiver.disconnect()
    return {
        "rate": received / (last - began),
        "publish_rate": n / (sent - began),
        "lost": n - received,
    }


SCENARIOS = {
    "sequential": sequential,
    "concurrent": concurrent,
    "fanout": fanout,
    "replay": replay,
    "first_event": first_event,
    "catch_up": catch_up,
    "memory_subscribers": memory_subscribers,
    "stalled": stalled,
    "transport_publish": transport_publish,
}
