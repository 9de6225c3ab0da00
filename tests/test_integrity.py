"""Safe across processes, and one bad input fails alone.

* A transport that reaches other processes refuses to run without a shared log.
* Envelopes of another log, and messages that are not envelopes, are ignored,
  logged once per channel, and counted.
* A bad string fails its own publish only; a batch refused by the database is
  retried one item at a time, so the good items of it are stored gap-free.
* Integers beyond 2**63 - 1 and other bad arguments are ``InvalidArgument``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from broadcast_history import (
    Broadcast,
    BroadcastBackend,
    EventLog,
    InvalidArgument,
    InvalidMessage,
    Retention,
)
from broadcast_history.backends.memory import MemoryBackend
from broadcast_history.log import Pending
from tests.conftest import REDIS_URL, BackendFactory, MakeBroadcast, require_redis, unique
from tests.support.helpers import assert_contiguous, take

CROSSING = [
    "redis://127.0.0.1:6379",
    "rediss://127.0.0.1:6379",
    "redis-stream://127.0.0.1:6379",
    "rediss-stream://127.0.0.1:6379",
    "postgres://postgres@127.0.0.1/test",
    "postgresql://postgres@127.0.0.1/test",
    "kafka://127.0.0.1:9092",
]
MAX = 2**63 - 1


# -- a shared log is required ------------------------------------------------------


@pytest.mark.parametrize("url", CROSSING)
def test_crossing_transport_without_log_is_refused(url: str) -> None:
    with pytest.raises(InvalidArgument, match=r"log=.*postgresql\+asyncpg.*sqlite") as info:
        Broadcast(url)
    assert url in str(info.value)


@pytest.mark.parametrize(
    "log",
    [
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite://",
        "sqlite://",
        "sqlite:///:memory:",
        # As URIs: each worker kept a log of its own (found by a probe).
        "sqlite+aiosqlite:///file:probe?mode=memory&cache=shared&uri=true",
        "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true",
    ],
)
def test_crossing_transport_with_an_in_memory_log_is_refused(log: str) -> None:
    """Named explicitly, the private log was accepted: with several workers, offsets
    collided and subscribers missed a third of the events."""
    with pytest.raises(InvalidArgument, match="or an in-memory one"):
        Broadcast(CROSSING[0], log=log)
    with pytest.raises(InvalidArgument, match="share one event log"):
        Broadcast(CROSSING[0], log=EventLog(log))
    assert EventLog(log).private and not EventLog("sqlite:///events.db").private
    Broadcast("memory://", log=log)


def test_memory_keeps_its_private_log_and_instances_may_say_they_cross() -> None:
    Broadcast("memory://")
    Broadcast()

    class Crossing(MemoryBackend):
        crosses_processes = True

    with pytest.raises(InvalidArgument, match="share one event log"):
        Broadcast(backend=Crossing())
    Broadcast(backend=Crossing(), log="sqlite+aiosqlite:///unused.db")

    class Unknown(BroadcastBackend):  # says nothing: not checked
        def __init__(self) -> None:
            pass

    Broadcast(backend=Unknown())


SHARED_LOG_ERROR = """
import sys
from broadcast_history import Broadcast, InvalidArgument
try:
    Broadcast(sys.argv[1])
except InvalidArgument as exc:
    print("refused:", exc)
else:
    print("accepted")
"""


def test_two_processes_on_redis_without_a_log_get_the_clear_error() -> None:
    # broadcaster's multi-worker chat, after changing only the import: each worker
    # must be told at start-up, not lose messages later.
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARED_LOG_ERROR, REDIS_URL], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    for output in outputs:
        assert output.startswith("refused:"), output
        assert "share one event log" in output and "log=" in output


# -- foreign messages on the transport ------------------------------------------------


@pytest.mark.two_hosts
async def test_envelopes_of_another_log_are_ignored_and_reported_once(
    transport: BackendFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two processes share the transport but not the log: each must see only its own.
    ours = Broadcast(backend=await transport(), log=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    theirs = Broadcast(backend=await transport(), log=f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    channel = unique()
    async with ours, theirs, ours.subscribe(channel) as sub:
        caplog.set_level(logging.ERROR, logger="broadcast_history")
        for i in range(5):
            await theirs.publish(channel, f"theirs {i}")
        mine = [await ours.publish(channel, f"mine {i}") for i in range(3)]
        got = await take(sub, 3)
        assert got == mine
        for _ in range(100):
            if ours.foreign_messages["other_log"] >= 1:
                break
            await asyncio.sleep(0.05)
    assert ours.foreign_messages["other_log"] >= 1
    reports = [r for r in caplog.records if "another event log" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert theirs.log.url.database is not None


async def test_messages_that_are_not_envelopes_warn_once_per_channel(
    sqlite_file_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis()
    from broadcast_history.backends.redis import RedisBackend

    caplog.set_level(logging.WARNING, logger="broadcast_history")
    raw = RedisBackend(REDIS_URL)
    channels = [unique(), unique()]
    async with Broadcast(REDIS_URL, log=sqlite_file_url) as broadcast:
        async with broadcast.subscribe(channels[0]) as first, broadcast.subscribe(channels[1]):
            await raw.connect()
            try:
                for i in range(20):
                    await raw.publish(channels[i % 2], f"plain text {i}")
                event = await broadcast.publish(channels[0], "an envelope")
                assert await take(first, 1) == [event]
                for _ in range(100):
                    if broadcast.foreign_messages["not_envelope"] >= 20:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await raw.disconnect()
    assert broadcast.foreign_messages["not_envelope"] == 20
    warnings = [r for r in caplog.records if "not broadcast_history envelopes" in r.getMessage()]
    assert len(warnings) == 2  # one per channel, not one per message


# -- one bad input fails alone ---------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "message", "key", "error"),
    [
        ("c", "\ud800", None, InvalidMessage),
        ("c", "ok \udfff then", None, InvalidMessage),
        ("c\ud800", "x", None, InvalidArgument),
        ("c", "x", "\ud800", InvalidArgument),
        ("c", "x", "k\x00", InvalidArgument),
    ],
)
async def test_bad_strings_are_refused_before_queueing(
    make_broadcast: MakeBroadcast, channel: str, message: str, key: str | None, error: type
) -> None:
    broadcast = await make_broadcast()
    good = unique()
    results: list[Any] = await asyncio.gather(
        *[broadcast.publish(good, f"good {i}") for i in range(5)],
        broadcast.publish(channel, message, key=key),
        *[broadcast.publish(good, f"good {i}") for i in range(5, 10)],
        return_exceptions=True,
    )
    assert isinstance(results[5], error), results[5]
    stored = results[:5] + results[6:]
    assert_contiguous(sorted(stored, key=lambda e: e.offset), 1, 10)
    assert [e.message for e in await broadcast.log.read(good, limit=20)] == [
        f"good {i}" for i in range(10)
    ]


async def test_batch_refused_by_the_database_is_retried_item_by_item(
    make_broadcast: MakeBroadcast,
) -> None:
    """Fault injection: an item that skipped validation reaches the log in a batch."""
    broadcast = await make_broadcast()
    good = unique()
    # A lone surrogate in the channel name: every database driver refuses to encode it.
    poisoned = broadcast._appender.submit(Pending("bad\ud800", "x", None))
    publishes = [broadcast.publish(good, f"good {i}") for i in range(10)]
    results = await asyncio.gather(poisoned, *publishes, return_exceptions=True)
    assert isinstance(results[0], InvalidArgument), results[0]
    events = results[1:]
    assert not any(isinstance(e, BaseException) for e in events), events
    assert_contiguous(sorted(events, key=lambda e: e.offset), 1, 10)
    assert_contiguous(await broadcast.log.read(good, limit=20), 1, 10)


async def test_a_channel_at_the_largest_offset_fails_alone(
    make_broadcast: MakeBroadcast,
) -> None:
    """A channel imported at the last offset a 64-bit integer holds: on SQLite its
    next publish raised a bare OverflowError, and so did every publish committed in
    the same batch; importing one past it made the channel unexportable."""
    from broadcast_history.admin import HistoryAdmin, InvalidExport

    broadcast = await make_broadcast()
    full, good = unique(), unique()

    def export(last: int) -> list[str]:
        return [
            json.dumps(
                {"type": "channel", "format": 1, "name": full, "epoch": 7,
                 "first_offset": last, "last_offset": last,
                 "last_timestamp": "2024-01-01T00:00:00.000001+00:00",
                 "trimmed_timestamp": "2024-01-01T00:00:00+00:00"}
            ),
            json.dumps(
                {"type": "event", "channel": full, "offset": last, "epoch": 7,
                 "timestamp": "2024-01-01T00:00:00.000001+00:00", "key": None,
                 "encoding": "text", "message": "m"}
            ),
        ]  # fmt: skip

    admin = HistoryAdmin.of(broadcast)
    with pytest.raises(InvalidExport, match="last_offset must be below"):
        await admin.import_jsonl(export(MAX))
    await admin.import_jsonl(export(MAX - 1))
    assert (await broadcast.publish(full, "the last one")).offset == MAX
    outcomes = await asyncio.gather(
        *(broadcast.publish(good, f"good {i}") for i in range(5)),
        broadcast.publish(full, "one too many"),
        *(broadcast.publish(good, f"good {i}") for i in range(5, 10)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[5], InvalidArgument), outcomes[5]
    events = outcomes[:5] + outcomes[6:]
    assert not any(isinstance(e, BaseException) for e in events), events


async def test_retrying_item_by_item_lets_other_tasks_run_between_commits(
    sqlite_file_url: str,
) -> None:
    """SQLite commits a lone event on the loop without suspending; a long retry must
    still give other tasks their turns between its commits."""
    async with Broadcast(log=sqlite_file_url) as broadcast:
        good = unique()
        order: list[str] = []
        append = broadcast.log.append

        async def counted(items: list[Pending]) -> list[Any]:
            order.append(f"commit {len(items)}")
            return await append(items)

        broadcast.log.append = counted  # type: ignore[method-assign]
        # Queued together, so the first commit holds all 21.
        poisoned = broadcast._appender.submit(Pending("bad\ud800", "x", None))
        publishes = [
            broadcast._appender.submit(Pending(good, f"good {i}", None)) for i in range(20)
        ]
        done = False

        async def ticker() -> None:
            while not done:
                order.append("tick")
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        results = await asyncio.gather(poisoned, *publishes, return_exceptions=True)
        done = True
        await ticking
        assert isinstance(results[0], InvalidArgument)
        assert order[0] == "commit 21", order
        retries = [i for i, step in enumerate(order) if step == "commit 1"]
        assert len(retries) == 21, order
        # Another task ran between every two commits of the retry.
        assert all("tick" in order[a:b] for a, b in itertools.pairwise(retries)), order
        assert_contiguous(await broadcast.log.read(good, limit=30), 1, 20)


# -- integers and other arguments --------------------------------------------------


async def test_integers_beyond_64_bits_are_invalid_arguments(sqlite_file_url: str) -> None:
    async with Broadcast(log=sqlite_file_url) as broadcast:
        channel = unique()
        await broadcast.publish(channel, "x")
        log = broadcast.log
        for call in (
            log.read(channel, before=2**64),
            log.read(channel, after=MAX + 1),
            log.read(channel, since=2**64),
            log.read(channel, limit=2**64),
            log.read(channel, after=-1),
            log.trim(channel, before=2**64),
        ):
            with pytest.raises(InvalidArgument):
                await call
        assert await log.read(channel, before=MAX) != []
        for options in ({"since": 2**64}, {"history": 2**64}, {"since": 1, "epoch": 2**64}):
            with pytest.raises(InvalidArgument):
                async with broadcast.subscribe(channel, **options):
                    pass


@pytest.mark.parametrize(
    "options",
    [
        {"page_size": 2**64},  # it goes into SQL LIMIT: OverflowError on the first replay
        {"buffer_size": 2**64},
        {"page_bytes": 2**64},
        {"idle_check": float("nan")},
        {"reorder_window": float("inf")},
    ],
)
def test_options_beyond_their_range_are_refused_up_front(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        Broadcast(**options)


async def test_retention_of_any_age_or_size_runs(sqlite_file_url: str) -> None:
    for bad in ({"max_events": 2**64}, {"interval": float("nan")}):
        with pytest.raises(InvalidArgument):
            Retention(**bad)
    async with Broadcast(log=sqlite_file_url) as broadcast:
        for i in range(3):
            await broadcast.publish("c", str(i))
        # Reaching back before year 1: nothing is that old (it raised OverflowError,
        # so the broadcast's retention pass failed at every interval).
        ages = timedelta(days=9000 * 366)
        assert await broadcast.log.apply_retention(Retention(max_age=ages)) == 0
        assert await broadcast.log.apply_retention(Retention(max_age=ages, max_events=1)) == 2


async def test_trim_with_a_wrong_type_is_an_invalid_argument(sqlite_file_url: str) -> None:
    async with Broadcast(log=sqlite_file_url) as broadcast:
        await broadcast.publish("c", "x")
        with pytest.raises(InvalidArgument):
            await broadcast.log.trim("c", before="x")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await broadcast.log.trim("c", before_time="yesterday")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="naive"):
            await broadcast.log.trim("c", before_time=datetime(2024, 1, 1))
        assert (
            await broadcast.log.trim("c", before_time=datetime(2000, 1, 1, tzinfo=timezone.utc))
            == 0
        )


def test_times_are_read_as_written() -> None:
    """Python's fromisoformat takes any character between date and time: a date with
    a zone ("2026-11-28Z", as typed in the console or the API) was refused as naive,
    and "2026-11-28+02:00" read as 02:00 with no zone (found by a probe)."""
    from broadcast_history._parse import parse_time

    utc, plus2 = timezone.utc, timezone(timedelta(hours=2))
    assert parse_time("2026-11-28Z", "since") == datetime(2026, 11, 28, tzinfo=utc)
    assert parse_time("2026-11-28+02:00", "since") == datetime(2026, 11, 28, tzinfo=plus2)
    assert parse_time("2026-11-28T10:00+02", "since") == datetime(2026, 11, 28, 10, tzinfo=plus2)
    assert parse_time("20261128T103000.5Z", "since") == datetime(
        2026, 11, 28, 10, 30, 0, 500000, tzinfo=utc
    )
    stamp = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=utc)
    assert parse_time(stamp.isoformat(), "since") == stamp
    # isoformat() writes an offset of seconds (old zones, LMT): read back as written.
    odd = datetime(1900, 1, 1, tzinfo=timezone(timedelta(minutes=19, seconds=32)))
    assert parse_time(odd.isoformat(), "since") == odd
    assert parse_time("2026-11-28 10:00:00 +02:00", "since") == datetime(
        2026, 11, 28, 10, tzinfo=plus2
    )
    for naive in ("2026-11-28", "2026-11-28T10:00"):
        with pytest.raises(InvalidArgument, match="naive"):
            parse_time(naive, "since")
    for bad in (
        "2026-11-28X10:00Z",
        "2026-11-28T25:00Z",
        "2026-W48Z",
        "2026-11-28T10:00+24:00",
        "2026-11-28T10:00+02:99",
        "2026-1128T10:00Z",  # extended and basic forms mixed
        "2026-11-28T1000:00Z",
    ):
        with pytest.raises(InvalidArgument, match="ISO 8601"):
            parse_time(bad, "since")


async def test_read_since_an_offset_means_after_it(sqlite_file_url: str) -> None:
    async with Broadcast(log=sqlite_file_url) as broadcast:
        for i in range(5):
            await broadcast.publish("c", str(i))
        assert [e.offset for e in await broadcast.log.read("c", since=3)] == [4, 5]
        with pytest.raises(InvalidArgument, match="not both"):
            await broadcast.log.read("c", since=3, after=1)


def test_sqlite_synchronous_must_be_a_known_level() -> None:
    with pytest.raises(InvalidArgument, match="sqlite_synchronous"):
        EventLog("sqlite+aiosqlite:///x.db", sqlite_synchronous="bogus")  # type: ignore[arg-type]
    log = EventLog("sqlite+aiosqlite:///x.db", sqlite_synchronous="full")
    assert log._store._synchronous == "FULL"  # type: ignore[attr-defined]


def test_url_and_backend_together_are_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        Broadcast("memory://", backend=MemoryBackend())


def test_positions_in_text_may_have_leading_zeros() -> None:
    """A 20-digit position was refused though its value was 1."""
    from broadcast_history._parse import parse_int

    assert parse_int("00000000000000000001", "since") == 1
    assert parse_int(" 0 ", "since") == 0
    assert parse_int("0" * 40 + str(MAX), "since") == MAX
    assert parse_int("0" * 5000 + "1", "since") == 1  # past int()'s 4,300 digits
    for bad in (str(MAX + 1), "1" * 25, "-1", "1.0", "\u0661"):
        with pytest.raises(InvalidArgument):
            parse_int(bad, "since")
