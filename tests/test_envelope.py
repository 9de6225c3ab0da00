"""The envelope codec on its own: round trips, size limits, notices, foreign input."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from broadcast_history import Event
from broadcast_history._envelope import NotAnEnvelope, OtherLog, decode, encode
from broadcast_history._event import NOTICE, from_micros, to_micros
from broadcast_history.log._rows import rows_to_events

LOG = "0123456789abcdef"
WHEN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def stored(offset: int, message: str | bytes, key: str | None = None) -> Event:
    return Event("chat", message, offset, WHEN, 77, key)


@pytest.mark.parametrize(
    "events",
    [
        [stored(1, "hello")],
        [stored(1, "ünïcødé ✓ 𝄞"), stored(2, b"\x00\xffbinary"), stored(3, "", key="k")],
        [stored(n, f"m{n}") for n in range(1, 101)],
        [stored(1, 'quotes " and \\ and \n newlines')],
    ],
    ids=["one", "mixed", "many", "escapes"],
)
def test_round_trip(events: list[Event]) -> None:
    [text] = encode(events, LOG)
    assert text.startswith(f"bh2:{LOG}:")
    assert decode("chat", text, LOG) == events
    assert decode("chat", text.encode(), LOG) == events  # some transports give bytes


def test_a_size_limit_splits_envelopes_and_turns_giants_into_notices() -> None:
    events = [stored(n, "x" * 300) for n in range(1, 21)] + [stored(21, "y" * 5000)]
    texts = encode(events, LOG, max_size=1000)
    assert len(texts) > 1
    assert all(len(text.encode()) <= 1000 for text in texts)
    decoded = [event for text in texts for event in decode("chat", text, LOG)]
    assert [e.offset for e in decoded] == list(range(1, 22))
    assert decoded[:20] == events[:20]
    assert decoded[20].message is NOTICE and decoded[20].offset == 21


@pytest.mark.parametrize(
    "text",
    [
        "plain text from another program",
        b"\xff\xfe not utf-8",
        'bh1:[7,[[1,0,"s","old format",null]]]',
        f"bh2:{LOG}",
        f"bh2:{LOG}:[7,",
        f"bh2:{LOG}:[7,[[1,0]]]",
        f"bh2:{LOG}:" + '{"a": 1}',
        # Forged or corrupt text in the right frame: every way fails as NotAnEnvelope.
        f"bh2:{LOG}::" + '[7,[[1,99999999999999999999,"s","x",null]]]',
        f"bh2:{LOG}::" + '[7,[[1,1e400,"s","x",null]]]',
        f"bh2:{LOG}::" + '[7,[[-1,0,"s","x",null]]]',
        f"bh2:{LOG}::" + '[7,[[true,0,"s","x",null]]]',
        f"bh2:{LOG}::" + '[7,[[1,0,"s",5,null]]]',
        f"bh2:{LOG}::" + '[7,[[1,0,"s","x",5]]]',
        f"bh2:{LOG}::" + '[7,[[1,0,"b","not base64!",null]]]',
        f"bh2:{LOG}::" + '[7,[[1,0,"q","x",null]]]',
        f"bh2:{LOG}::" + "[" * 100_000 + "]" * 100_000,
    ],
    ids=[
        "text",
        "bytes",
        "v1",
        "no-body",
        "cut",
        "short-record",
        "object",
        "huge-time",
        "float-time",
        "negative-offset",
        "bool-offset",
        "number-payload",
        "number-key",
        "bad-base64",
        "unknown-kind",
        "deep-nesting",
    ],
)
def test_what_is_not_an_envelope(text: str | bytes) -> None:
    with pytest.raises(NotAnEnvelope):
        decode("chat", text, LOG)


def test_an_envelope_of_another_log_names_it() -> None:
    [text] = encode([stored(1, "theirs")], "fedcba9876543210")
    with pytest.raises(OtherLog) as info:
        decode("chat", text, LOG)
    assert info.value.log_id == "fedcba9876543210"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "micros",
    [
        0,
        1,
        999_999,
        1_764_124_800_123_456,
        2**32 * 1_000_000 - 1,
        2**32 * 1_000_000,
        253_402_300_799_999_999,
        -1,
    ],
)
def test_timestamps_convert_exactly(micros: int) -> None:
    # from_micros takes a float shortcut below the year 2106: it must never be off
    # by a microsecond, there or past it.
    moment = from_micros(micros)
    assert moment == _EPOCH + timedelta(microseconds=micros)
    assert to_micros(moment) == micros


def test_timestamps_convert_exactly_at_random() -> None:
    rng = random.Random(5)
    for _ in range(100_000):
        micros = rng.randrange(2**32 * 1_000_000)
        assert to_micros(from_micros(micros)) == micros


def test_replayed_rows_get_their_exact_timestamps() -> None:
    # Replay builds a datetime from the fields of the second it is in while the rows
    # stay in that second: across seconds, days, years, the epoch and 2106 alike, and
    # from the microsecond before the epoch (first row or not).
    rng = random.Random(7)
    starts = [0, -1_500_000, 1_735_689_599_000_000, 2**32 * 1_000_000 - 700_000]
    starts += [rng.randrange(-(10**16), 253_402_300_000_000_000) for _ in range(50)]
    runs = [sorted(start + rng.randrange(0, 3_000_000) for _ in range(300)) for start in starts]
    runs += [[-1], [-2, -1], [-1, 0]]
    for micros in runs:
        rows = [(n, 1, m, True, b"x", None) for n, m in enumerate(micros, 1)]
        stamps = [event.timestamp for event in rows_to_events("c", rows)]
        assert stamps == [_EPOCH + timedelta(microseconds=m) for m in micros]
        assert all(stamp.tzinfo is timezone.utc for stamp in stamps)  # type: ignore[union-attr]
