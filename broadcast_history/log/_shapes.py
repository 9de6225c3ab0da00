"""IN lists padded to a few lengths, so that statements take a few shapes.

An IN list of each length is a statement text of its own, and drivers prepare and keep
each text they run: Python's sqlite3 module keeps the last 128 per connection, about
180 bytes per parameter (10 MB for lists of a few hundred names), asyncpg and the
Postgres server keep theirs per connection too. Lookups over a varying number of
channels (subscriptions opened together, a commit over many channels) would fill those
caches with texts that never run again. Padded to a power of two, a list of up to 500
values takes one of ten lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

_T = TypeVar("_T")


def power_runs(values: Sequence[_T]) -> list[Sequence[_T]]:
    """``values`` cut into runs whose lengths are powers of two, longest first: for a
    statement with a row per value, where a value repeated would change the result (a
    multi-row upsert), as a few statements of a few shapes each."""
    runs: list[Sequence[_T]] = []
    at = 0
    for bit in reversed(range(len(values).bit_length())):
        if len(values) >> bit & 1:
            runs.append(values[at : at + (1 << bit)])
            at += 1 << bit
    return runs


def padded(values: Sequence[_T]) -> list[_T]:
    """``values`` with the last one repeated up to a power of two (a value repeated
    in an IN list changes nothing it selects)."""
    if not values:
        return []
    size = 1 << (len(values) - 1).bit_length()
    return [*values, *[values[-1]] * (size - len(values))]
