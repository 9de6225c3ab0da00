"""What must hold after a run, checked from the log and from every process's records.

The log is read with plain SQL on the lab's Postgres, not through the library, so a
bug in the library's read path cannot hide one in its write path. Every message is
its own id (and its idempotency key), which makes each stored event traceable to the
publish that made it.

* The log: each channel's offsets run 1..last_offset with no hole, every event has
  the channel's epoch, and every stored message was published by someone (no phantom).
* Each publish that returned: its message is stored exactly once, at the offset and
  epoch it returned.
* Each publish that only raised: its message is stored at most once.
* The run had traffic: publishes were acknowledged, and made while the fault was on;
  a publisher that gave up retrying is a finding.
* Each subscriber, across its restarts and re-subscriptions: every event from its
  start position on, once each, in offset order, with the log's epoch and message;
  each resumption starts from the last event it recorded; it reached the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

# Errors a subscriber may see while a server is down; anything else is a finding.
_EXPECTED_ERRORS = ("LogUnavailable", "TransportError", "NotConnected")


@dataclass
class ChannelLog:
    """A channel as stored: its row and its events (offset -> (epoch, key, message))."""

    name: str
    epoch: int
    last_offset: int
    first_offset: int
    events: dict[int, tuple[int, str | None, str]] = field(default_factory=dict)


@dataclass
class Result:
    """Counts and anomalies of one run."""

    acked: int = 0  # publishes that returned
    publish_errors: int = 0  # publish calls that raised (each was retried)
    unacked: int = 0  # messages whose publish never returned (raised or killed)
    unacked_stored: int = 0  # ...of which the log has the message anyway
    stored: int = 0
    delivered: int = 0  # subscriber events checked
    subscriber_errors: int = 0  # errors subscribers saw and recovered from
    anomalies: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.anomalies.append(message)


async def read_log(dsn: str, channels: list[str]) -> dict[str, ChannelLog]:
    """The stored state of ``channels`` (absent ones are left out)."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        heads = await conn.fetch(
            "SELECT name, epoch, last_offset, first_offset FROM broadcast_channels "
            "WHERE name = ANY($1::text[])",
            channels,
        )
        logs = {row["name"]: ChannelLog(*row) for row in heads}
        rows = await conn.fetch(
            'SELECT channel, "offset", epoch, key, payload FROM broadcast_events '
            'WHERE channel = ANY($1::text[]) ORDER BY channel, "offset"',
            channels,
        )
    finally:
        await conn.close()
    for row in rows:
        log = logs.get(row["channel"])
        if log is None:
            log = logs[row["channel"]] = ChannelLog(row["channel"], row["epoch"], 0, 1)
        log.events[row["offset"]] = (row["epoch"], row["key"], bytes(row["payload"]).decode())
    return logs


def check_log(logs: dict[str, ChannelLog], result: Result) -> dict[str, list[tuple[str, int]]]:
    """Check each channel's history; returns message -> [(channel, offset)] stored."""
    where: dict[str, list[tuple[str, int]]] = {}
    for log in logs.values():
        offsets = sorted(log.events)
        result.stored += len(offsets)
        expected = list(range(log.first_offset, log.last_offset + 1))
        if log.first_offset != 1 or offsets != expected:
            missing = sorted(set(expected) - set(offsets))
            extra = sorted(set(offsets) - set(expected))
            result.add(
                f"log {log.name}: offsets are not 1..{log.last_offset} "
                f"(first {log.first_offset}, missing {missing[:5]}, beyond {extra[:5]})"
            )
        for offset in offsets:
            epoch, key, message = log.events[offset]
            if epoch != log.epoch:
                result.add(f"log {log.name}@{offset}: epoch {epoch}, channel has {log.epoch}")
            if key != message:
                result.add(f"log {log.name}@{offset}: key {key!r} but message {message!r}")
            where.setdefault(message, []).append((log.name, offset))
    return where


def check_publishers(
    publishers: dict[str, list[dict[str, Any]]],
    where: dict[str, list[tuple[str, int]]],
    logs: dict[str, ChannelLog],
    result: Result,
) -> None:
    """Every acknowledged publish stored once where it said; the rest at most once."""
    tried: dict[str, str] = {}  # message -> channel
    acked: dict[str, tuple[int, int]] = {}  # message -> (offset, epoch)
    for records in publishers.values():
        for record in records:
            kind = record["k"]
            if kind == "try":
                tried[record["id"]] = record["ch"]
            elif kind == "ok":
                acked[record["id"]] = (record["off"], record["ep"])
            elif kind == "err" and "id" in record:
                result.publish_errors += 1
            elif kind == "raised":
                result.add(
                    f"raised: publish of {record['id']!r} raised {record['error']}, "
                    "none of the library's errors"
                )
            elif kind == "gave_up":
                result.add(
                    f"gave up: publish of {record['id']!r} still failed long after the run "
                    "(publishing never recovered)"
                )
    result.acked = len(acked)
    for message, places in where.items():
        if message not in tried:
            result.add(f"phantom: {message!r} is stored at {places} but nobody published it")
        elif len(places) > 1:
            result.add(f"duplicate: {message!r} is stored {len(places)} times: {places}")
        elif places[0][0] != tried[message]:
            result.add(f"misplaced: {message!r} was published on {tried[message]}, stored {places}")
    for message, (offset, epoch) in acked.items():
        channel = tried[message]
        places = where.get(message, [])
        if not places:
            result.add(
                f"lost: publish of {message!r} returned {channel}@{offset} but it is not stored"
            )
        elif (channel, offset) not in places:
            result.add(
                f"moved: publish of {message!r} returned {channel}@{offset}, stored {places}"
            )
        elif channel in logs and epoch != logs[channel].epoch:
            result.add(f"epoch: publish of {message!r} returned epoch {epoch}")
    for message in tried.keys() - acked.keys():
        result.unacked += 1
        if message in where:
            result.unacked_stored += 1


def check_subscriber(
    name: str, records: list[dict[str, Any]], log: ChannelLog | None, result: Result
) -> None:
    """One subscriber's deliveries: gap-free from its start, once each, in order."""
    expected: int | None = None  # next offset due
    for record in records:
        kind = record["k"]
        if kind == "start":
            if "since" in record and record["pos"] != record["since"]:
                result.add(f"{name}: asked since={record['since']}, started at {record['pos']}")
            if expected is None:
                expected = record["pos"] + 1
            elif record.get("since") != expected - 1:
                result.add(f"{name}: resumed since={record.get('since')}, last was {expected - 1}")
                expected = record["pos"] + 1
        elif kind == "err":
            result.subscriber_errors += 1
            if not record["error"].startswith(_EXPECTED_ERRORS):
                result.add(f"{name}: unexpected error {record['error']}")
        elif kind == "ev":
            result.delivered += 1
            offset = record["off"]
            if expected is None:
                result.add(f"{name}: event {offset} before any start")
            elif offset > expected:
                result.add(f"{name}: gap, events {expected}..{offset - 1} never delivered")
            elif offset < expected:
                result.add(f"{name}: event {offset} again or out of order (expected {expected})")
            expected = offset + 1
            stored = log.events.get(offset) if log is not None else None
            if stored is None:
                result.add(f"{name}: delivered {offset}, which the log does not have")
            elif (record["ep"], record["id"]) != (stored[0], stored[2]):
                result.add(f"{name}: event {offset} is {record['id']!r} (epoch {record['ep']}), "
                           f"the log has {stored[2]!r} (epoch {stored[0]})")  # fmt: skip
    head = log.last_offset if log is not None else 0
    last = (expected or 1) - 1
    if last < head:
        result.add(f"{name}: stopped at {last}, the head is {head}")


def check_traffic(
    publishers: dict[str, list[dict[str, Any]]],
    fault_window: tuple[float, float] | None,
    result: Result,
) -> None:
    """A run that published nothing, or nothing while its fault was on, checked
    nothing: it must not pass."""
    if result.acked == 0:
        result.add("nothing was published: the run checked nothing")
    if fault_window is not None:
        began, ended = fault_window
        tried = sum(
            1
            for records in publishers.values()
            for record in records
            if record["k"] == "try" and began <= record["t"] <= ended
        )
        if tried == 0:
            result.add("no publish was made while the fault was on: it tested nothing")


def check_run(
    logs: dict[str, ChannelLog],
    publishers: dict[str, list[dict[str, Any]]],
    subscribers: dict[str, tuple[str, list[dict[str, Any]]]],
    fault_window: tuple[float, float] | None = None,
) -> Result:
    """Every check above on one run; ``subscribers`` maps a name to (channel, records);
    ``fault_window`` is when the fault ran (Unix times), ``None`` without a fault."""
    result = Result()
    where = check_log(logs, result)
    check_publishers(publishers, where, logs, result)
    check_traffic(publishers, fault_window, result)
    for name, (channel, records) in sorted(subscribers.items()):
        check_subscriber(name, records, logs.get(channel), result)
    return result
