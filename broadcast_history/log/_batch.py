"""An appended batch, planned before and assembled after the database allocates offsets.

The stores that allocate a whole batch at once (Postgres, MySQL) bump each channel's
counter by the number of items it stores and get the new last offset back; this
module decides which items are stored and turns the counters into events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .._event import Event, from_micros, stored_event
from ._info import Pending


class Plan(NamedTuple):
    """Which items of a batch are stored, and where they land in their channel."""

    #: Indexes of the items to store, in input order.
    fresh: list[int]
    #: Per fresh item: how many fresh items of its channel follow it in the batch,
    #: so its offset is the channel's new last offset minus this.
    later: list[int]
    #: Fresh items per channel (what each counter grows by).
    counts: dict[str, int]
    #: Index of an item -> index of the earlier item of the batch with its key.
    duplicate_of: dict[int, int]


def plan(items: Sequence[Pending], seen: Mapping[tuple[str, str], Event]) -> Plan:
    """Plan storing ``items``; ``seen`` holds their keys already stored."""
    fresh: list[int] = []
    claimed: dict[tuple[str, str], int] = {}  # key -> index of the item storing it
    duplicate_of: dict[int, int] = {}
    for index, (channel, _, key) in enumerate(items):
        if key is not None:
            if (channel, key) in seen:
                continue
            first = claimed.setdefault((channel, key), index)
            if first != index:
                duplicate_of[index] = first
                continue
        fresh.append(index)
    counts: dict[str, int] = {}
    for index in fresh:
        channel = items[index].channel
        counts[channel] = counts.get(channel, 0) + 1
    later: list[int] = []
    remaining = dict(counts)
    for index in fresh:
        channel = items[index].channel
        remaining[channel] -= 1
        later.append(remaining[channel])
    return Plan(fresh, later, counts, duplicate_of)


def assemble(
    items: Sequence[Pending],
    batch: Plan,
    heads: Mapping[str, tuple[int, int, int]],
    seen: Mapping[tuple[str, str], Event],
) -> list[Event]:
    """The events of ``items``, in order, once stored.

    Args:
        heads: Per channel written: its epoch, new last offset and timestamp (µs).
        seen: The events of keys that were already stored.
    """
    stored: dict[int, Event] = {}
    stamps = {name: from_micros(head[2]) for name, head in heads.items()}
    for index, behind in zip(batch.fresh, batch.later, strict=True):
        channel, message, key = items[index]
        epoch, last, _ = heads[channel]
        stored[index] = stored_event(channel, message, last - behind, stamps[channel], epoch, key)
    results: list[Event] = []
    for index, item in enumerate(items):
        event = stored.get(index)
        if event is None:
            earlier = batch.duplicate_of.get(index)
            if earlier is not None:
                event = stored[earlier]
            else:
                assert item.key is not None  # neither fresh nor a repeat: seen
                event = seen[(item.channel, item.key)]
        results.append(event)
    return results
