"""The SQLite events table as stored today against a ``WITHOUT ROWID`` one, raw.

``python -m bench.sqlite_layout``: for each layout, 1 and 100 channels round-robin,
and payloads of 100 and 1,000 bytes (``--payloads``), commits batches of 51 events as
the store does (the rows, then each touched channel's counter, in one ``BEGIN
IMMEDIATE``; WAL, ``synchronous=NORMAL``, the store's page size unless
``--page-size``) and prints the median commit time, the rate and the file's size;
then replays the first channel in pages of 1,000 rows (best of three). ``sqlite3``
alone: no event loop, no SQLAlchemy, so only the layout differs."""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from broadcast_history.log._engine import PAGE_SIZE, WAL_CHECKPOINT_PAGES
from broadcast_history.log._schema import KEY_INDEX, TIME_INDEX, channels, events

BATCH = 51
PAGE = 1_000


def _schema(without_rowid: bool) -> list[str]:
    dialect = sqlite.dialect()
    table = str(CreateTable(events).compile(dialect=dialect)).strip()
    if without_rowid:
        table += " WITHOUT ROWID"
    return [
        table,
        str(CreateIndex(TIME_INDEX).compile(dialect=dialect)),
        str(CreateIndex(KEY_INDEX).compile(dialect=dialect)),
        str(CreateTable(channels).compile(dialect=dialect)),
    ]


def run(
    path: str, without_rowid: bool, count: int, size: int, batches: int, page_size: int = PAGE_SIZE
) -> str:
    """One layout, one shape: a line of figures."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    for statement in _schema(without_rowid):
        db.execute(statement)
    names = [f"bench-channel-{i}" for i in range(count)]
    db.executemany(
        "INSERT INTO broadcast_channels VALUES (?, 1, 0, 0, 1, NULL)", [(n,) for n in names]
    )
    last = dict.fromkeys(names, 0)
    payload = b"x" * size
    insert = "INSERT INTO broadcast_events VALUES (?, ?, 1, ?, 1, ?, NULL)"
    advance = "UPDATE broadcast_channels SET last_offset = ?, last_timestamp = ? WHERE name = ?"
    commits: list[float] = []
    sent = 0
    began = time.perf_counter()
    for _ in range(batches):
        rows = []
        for _ in range(BATCH):
            name = names[sent % count]
            sent += 1
            last[name] += 1
            rows.append((name, last[name], sent, payload))
        touched = {row[0]: row[1] for row in rows}
        start = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(insert, rows)
        db.executemany(advance, [(offset, sent, name) for name, offset in touched.items()])
        db.execute("COMMIT")
        commits.append(time.perf_counter() - start)
    rate = sent / (time.perf_counter() - began)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    query = (
        'SELECT "offset", epoch, timestamp, is_text, payload, key FROM broadcast_events '
        'WHERE channel = ? AND "offset" > ? ORDER BY "offset" LIMIT ?'
    )
    best = 0.0
    for _ in range(3):
        start, read, after = time.perf_counter(), 0, 0
        while page := db.execute(query, (names[0], after, PAGE)).fetchall():
            read += len(page)
            after = page[-1][0]
        best = max(best, read / (time.perf_counter() - start))
    megabytes = os.path.getsize(path) / 1e6
    db.close()
    layout = "without rowid" if without_rowid else "rowid"
    return (
        f"{layout:>13} {count:>3} channels {size:>5} B: commit p50 "
        f"{statistics.median(commits) * 1000:.3f} ms, {rate:,.0f} events/s, "
        f"{megabytes:.1f} MB; replay of one channel ({read:,} rows) {best:,.0f} rows/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4_000, help="commits per shape")
    parser.add_argument(
        "--page-size", type=int, default=PAGE_SIZE, help="of the new files (the store's by default)"
    )
    parser.add_argument(
        "--payloads", default="100,1000", help="payload sizes in bytes, comma-separated"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for size in map(int, args.payloads.split(",")):
            for count in (1, 100):
                for without_rowid in (False, True):
                    path = os.path.join(directory, f"{without_rowid}-{count}-{size}.db")
                    line = run(path, without_rowid, count, size, args.batches, args.page_size)
                    print(line, flush=True)
                    os.remove(path)


if __name__ == "__main__":
    main()
