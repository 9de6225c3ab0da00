"""The targets the table is checked against: issue 14's (JetStream as the peer, the
plain public API, fairness) and those of issue 5 that issue 14 does not tighten."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A target: ``metric`` of ``row`` on ``config`` (or a ratio of it) against ``value``.

    ``ratio`` names what ours is divided by: ``"theirs"`` (broadcaster, same row and
    configuration), ``"jetstream"`` (the JetStream peer, same row) or ``"row:<key>"``
    (ours on another row, same configuration).
    """

    row: str
    config: str
    metric: str
    op: str  # ">=" or "<="
    value: float
    text: str
    ratio: str | None = None


MAIN = ("memory+sqlite", "redis+postgres")

TARGETS = [
    # Issue 14: JetStream as the peer, the plain public API, fairness.
    *[
        Target(
            "concurrent_1",
            config,
            "rate",
            ">=",
            2.0,
            f"(14) Concurrent durable publish >= 2x JetStream, {config}",
            ratio="jetstream",
        )
        for config in MAIN
    ],
    Target(
        "replay",
        "memory+sqlite",
        "rate",
        ">=",
        3.0,
        "(14) Replay >= 3x JetStream, SQLite",
        ratio="jetstream",
    ),
    Target(
        "replay",
        "postgres+postgres",
        "rate",
        ">=",
        3.0,
        "(14) Replay >= 3x JetStream, Postgres",
        ratio="jetstream",
    ),
    Target(
        "sequential",
        "memory+sqlite",
        "p50_ms",
        "<=",
        1.0,
        "(14) Sequential p50 <= JetStream's, memory + SQLite",
        ratio="jetstream",
    ),
    Target(
        "sequential",
        "redis+postgres",
        "p50_ms",
        "<=",
        2.0,
        "(14) Sequential p50 <= 2x JetStream's, Redis + Postgres",
        ratio="jetstream",
    ),
    Target(
        "concurrent_1",
        "memory+sqlite",
        "rate",
        ">=",
        45_000,
        "(14) 64 concurrent publishers (public API), memory + SQLite file: >= 45,000/s",
    ),
    Target(
        "concurrent_1",
        "redis+postgres",
        "rate",
        ">=",
        40_000,
        "(14) 64 concurrent publishers (public API), Redis + Postgres: >= 40,000/s",
    ),
    *[
        Target(
            "concurrent_100",
            config,
            "rate",
            ">=",
            0.7,
            f"(14) 100 channels round-robin >= 0.7x one channel, {config}",
            ratio="row:concurrent_1",
        )
        for config in MAIN
    ],
    Target(
        "replay",
        "memory+sqlite",
        "rate",
        ">=",
        400_000,
        "(14) Replay into async for, SQLite: >= 400,000 events/s",
    ),
    Target(
        "replay",
        "postgres+postgres",
        "rate",
        ">=",
        500_000,
        "(14) Replay into async for, Postgres: >= 500,000 events/s",
    ),
    *[
        Target(
            "catch_up",
            config,
            "publish_rate",
            ">=",
            1900,
            f"(14) Catch-up: publisher asking 2,000/s gets >= 1,900/s, {config}",
        )
        for config in MAIN
    ],
    *[
        Target(
            "catch_up",
            config,
            "catchup_p50_s",
            "<=",
            1.0,
            f"(14) Catch-up p50 <= 1 s, {config}",
        )
        for config in MAIN
    ],
    Target(
        "sequential",
        "memory+sqlite",
        "p50_ms",
        "<=",
        0.35,
        "(14) Sequential publish -> receive p50, memory + SQLite file: <= 0.35 ms",
    ),
    Target(
        "sequential",
        "redis+postgres",
        "p50_ms",
        "<=",
        0.8,
        "(14) Sequential publish -> receive p50, Redis + Postgres: <= 0.8 ms",
    ),
    # Issue 5 (those issue 14 does not tighten).
    Target(
        "concurrent_1",
        "memory+sqlite",
        "rate",
        ">=",
        50_000,
        "(5) Concurrent durable publish, memory + SQLite file: >= 50,000 events/s",
    ),
    Target(
        "concurrent_1",
        "redis+postgres",
        "rate",
        ">=",
        30_000,
        "(5) Concurrent durable publish, Redis + Postgres: >= 30,000 events/s",
    ),
    *[
        Target(
            "concurrent_1",
            config,
            "rate",
            ">=",
            3.0,
            f"(5) Concurrent publish >= 3x broadcaster, {config}",
            ratio="theirs",
        )
        for config in ("memory+sqlite", "redis+postgres", "postgres+postgres")
    ],
    *[
        Target(
            "sequential",
            config,
            "rate",
            ">=",
            0.5,
            f"(5) Sequential rate >= 0.5x broadcaster (non-durable), {config}",
            ratio="theirs",
        )
        for config in ("memory+sqlite", "redis+postgres", "postgres+postgres")
    ],
    Target(
        "fanout",
        "memory+sqlite",
        "rate",
        ">=",
        500_000,
        "(5) Fan-out in-process (memory): >= 500,000 deliveries/s",
    ),
    Target(
        "stalled",
        "memory+sqlite",
        "extra_mb",
        "<=",
        50,
        "(5) Stalled subscriber extra RSS (memory + SQLite, 1M events): < 50 MB",
    ),
    Target(
        "stalled",
        "redis+postgres",
        "extra_mb",
        "<=",
        50,
        "(5) Stalled subscriber extra RSS (Redis + Postgres, 1M events): < 50 MB",
    ),
    Target(
        "catch_up", "memory+sqlite", "gaps", "<=", 0, "(5) Catch-up: zero gaps (memory + SQLite)"
    ),
    Target(
        "catch_up",
        "memory+sqlite",
        "duplicates",
        "<=",
        0,
        "(5) Catch-up: zero duplicates (memory + SQLite)",
    ),
]
