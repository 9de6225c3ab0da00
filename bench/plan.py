"""What is measured: scenarios with their sizes (full and quick); targets in ``targets``."""

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
    peer: bool = False  # also run on NATS JetStream (bench/jetstream.py)


ROWS = [
    Row(
        "sequential",
        "Sequential publish -> receive, {n:,} events",
        "sequential",
        {"n": 5000},
        {"n": 500},
        peer=True,
    ),
    Row(
        "concurrent_1",
        "Concurrent, 64 publishers, 1 channel, {n:,} events",
        "concurrent",
        {"n": 64_000, "channels": 1},
        # As bench.plain_api: 6,400 events took ~0.2 s, too short to time on a shared
        # machine (issue 14).
        {"n": 20_000, "channels": 1},
        peer=True,
    ),
    Row(
        "concurrent_100",
        "Concurrent, 64 publishers, 100 channels, {n:,} events",
        "concurrent",
        {"n": 64_000, "channels": 100},
        {"n": 20_000, "channels": 100},
        peer=True,
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
        peer=True,
    ),
    Row(
        "replay",
        "Replay since=0 over {size:,} events",
        "replay",
        {"size": 1_000_000},
        {"size": 50_000},
        OURS,
        peer=True,
    ),
    Row(
        "first_event_1m",
        "First event from the middle of a {size:,}-event log",
        "first_event",
        {"size": 1_000_000},
        {"size": 50_000},
        OURS,
        peer=True,
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
        peer=True,
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
