"""What is measured: scenarios with their sizes (full and quick) and the targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOTH = ("ours", "theirs")
OURS = ("ours",)


@dataclass(frozen=True)
class Row:
    """One scenario of the table, run for every configuration."""

    key: str
    title: str
    scenario: str
    full: dict[str, Any]
    quick: dict[str, Any]
    impls: tuple[str, ...] = BOTH
    timeout: float = 300


ROWS = [
    Row(
        "sequential",
        "Sequential publish -> receive, {n:,} events",
        "sequential",
        {"n": 5000},
        {"n": 500},
    ),
    Row(
        "concurrent_1",
        "Concurrent, 64 publishers, 1 channel, {n:,} events",
        "concurrent",
        {"n": 64_000, "channels": 1},
        {"n": 6400, "channels": 1},
    ),
    Row(
        "concurrent_100",
        "Concurrent, 64 publishers, 100 channels, {n:,} events",
        "concurrent",
        {"n": 64_000, "channels": 100},
        {"n": 6400, "channels": 100},
    ),
    Row(
        "transport_100",
        "Transport only: publish_many over {channels} channels, {n:,} messages",
        "transport_publish",
        {"n": 200_000, "channels": 100},
        {"n": 20_000, "channels": 100},
        OURS,
    ),
    Row(
        "fanout",
        "Fan-out, 1 publisher -> {subscribers:,} subscribers, {n:,} events",
        "fanout",
        {"n": 1000},
        {"n": 50, "subscribers": 200},
    ),
    Row(
        "replay",
        "Replay since=0 over {size:,} events",
        "replay",
        {"size": 1_000_000},
        {"size": 50_000},
        OURS,
    ),
    Row(
        "first_event_1m",
        "First event from the middle of a {size:,}-event log",
        "first_event",
        {"size": 1_000_000},
        {"size": 50_000},
        OURS,
    ),
    Row(
        "first_event_big",
        "First event from the middle of a {size:,}-event log",
        "first_event",
        {"size": 10_000_000},
        {"size": 200_000},
        OURS,
    ),
    Row(
        "catch_up",
        "Catch-up: {subscribers} reconnecting subscribers, {rate:,} events/s, {duration:.0f} s",
        "catch_up",
        {"preload": 10_000, "duration": 10.0},
        {"preload": 2000, "duration": 2.0, "subscribers": 20},
        OURS,
    ),
    Row(
        "memory_subscribers",
        "RSS, {subscribers:,} subscribers on {channels:,} channels",
        "memory_subscribers",
        {},
        {"subscribers": 1000, "channels": 100},
    ),
    Row(
        "stalled",
        "RSS, one stalled subscriber, {n:,} events published",
        "stalled",
        {"n": 1_000_000},
        {"n": 20_000},
    ),
]


# Full-run sizes cut down where a full size would not fit the run's time budget: the
# stalled-subscriber publish over a network transport, and everything on Kafka (tansu
# here delivers in ~0.2-1 s and creating a topic per channel is slow).
FULL_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    **{("stalled", c): {"n": 300_000} for c in ("redis+sqlite", "redis+postgres")},
    ("stalled", "postgres+postgres"): {"n": 300_000},
    ("stalled", "kafka+postgres"): {"n": 100_000},
    ("sequential", "kafka+postgres"): {"n": 500},
    ("concurrent_1", "kafka+postgres"): {"n": 12_800, "channels": 1},
    ("concurrent_100", "kafka+postgres"): {"n": 12_800, "channels": 100},
    ("fanout", "kafka+postgres"): {"n": 100},
    ("memory_subscribers", "kafka+postgres"): {"subscribers": 1000, "channels": 100},
    ("transport_100", "kafka+postgres"): {"n": 20_000, "channels": 100},
}


@dataclass(frozen=True)
class Target:
    """A target of issue 5: ``metric`` of ``row`` on ``config`` compared to ``value``."""

    row: str
    config: str
    metric: str
    op: str  # ">=" or "<="
    value: float
    text: str
    ratio: bool = False  # compare ours/theirs instead of ours


TARGETS = [
    Target(
        "concurrent_1",
        "memory+sqlite",
        "rate",
        ">=",
        50_000,
        "Concurrent durable publish, memory + SQLite file: >= 50,000 events/s",
    ),
    Target(
        "concurrent_1",
        "redis+postgres",
        "rate",
        ">=",
        30_000,
        "Concurrent durable publish, Redis + Postgres: >= 30,000 events/s",
    ),
    *[
        Target(
            "concurrent_1",
            config,
            "rate",
            ">=",
            3.0,
            f"Concurrent publish >= 3x broadcaster, {config}",
            ratio=True,
        )
        for config in ("memory+sqlite", "redis+postgres", "postgres+postgres")
    ],
    Target(
        "sequential",
        "memory+sqlite",
        "p50_ms",
        "<=",
        0.5,
        "Sequential publish -> receive p50, memory + SQLite file: <= 0.5 ms",
    ),
    Target(
        "sequential",
        "redis+postgres",
        "p50_ms",
        "<=",
        1.0,
        "Sequential publish -> receive p50, Redis + Postgres: <= 1 ms",
    ),
    *[
        Target(
            "sequential",
            config,
            "rate",
            ">=",
            0.5,
            f"Sequential rate >= 0.5x broadcaster (non-durable), {config}",
            ratio=True,
        )
        for config in ("memory+sqlite", "redis+postgres", "postgres+postgres")
    ],
    Target(
        "replay",
        "memory+sqlite",
        "rate",
        ">=",
        300_000,
        "Replay into async for, SQLite: >= 300,000 events/s",
    ),
    Target(
        "replay",
        "postgres+postgres",
        "rate",
        ">=",
        400_000,
        "Replay into async for, Postgres: >= 400,000 events/s",
    ),
    Target(
        "fanout",
        "memory+sqlite",
        "rate",
        ">=",
        500_000,
        "Fan-out in-process (memory): >= 500,000 deliveries/s",
    ),
    Target(
        "stalled",
        "memory+sqlite",
        "extra_mb",
        "<=",
        50,
        "Stalled subscriber extra RSS (memory + SQLite, 1M events): < 50 MB",
    ),
    Target(
        "stalled",
        "redis+postgres",
        "extra_mb",
        "<=",
        50,
        "Stalled subscriber extra RSS (Redis + Postgres, 1M events): < 50 MB",
    ),
    Target("catch_up", "memory+sqlite", "gaps", "<=", 0, "Catch-up: zero gaps (memory + SQLite)"),
    Target(
        "catch_up",
        "memory+sqlite",
        "duplicates",
        "<=",
        0,
        "Catch-up: zero duplicates (memory + SQLite)",
    ),
]

# Scenario defaults named in the titles when a row does not set them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "fanout": {"subscribers": 1000},
    "catch_up": {"subscribers": 100, "rate": 2000},
    "memory_subscribers": {"subscribers": 10_000, "channels": 1000},
}

UNITS = {
    "rate": ("/s", 0),
    "p50_ms": ("ms", 3),
    "p99_ms": ("ms", 3),
    "max_ms": ("ms", 2),
    "catchup_p50_s": ("s", 2),
    "catchup_max_s": ("s", 2),
    "reconnects": ("", 0),
    "checked": ("", 0),
    "gaps": ("", 0),
    "duplicates": ("", 0),
    "publish_rate": ("/s", 0),
    "rss_mb": ("MB", 1),
    "kb_per_sub": ("KB", 2),
    "extra_mb": ("MB", 1),
    "lost": ("", 0),
    "events": ("", 0),
}
