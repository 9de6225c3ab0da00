"""The benchmark suite runs end to end (smallest sizes, in-process configuration, the
JetStream peer), and so does the plain public-API script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("broadcaster", reason="the benchmarks compare with broadcaster 0.3.1")
pytest.importorskip("nats", reason="the benchmarks compare with NATS JetStream (nats-py)")

from bench import channel_ratio, plain_api, retention_scan, scenarios, sqlite_layout
from bench.jetstream import server_binary
from bench.run import main
from broadcast_history import Broadcast


def test_quick_rows_write_a_table(tmp_path: Path) -> None:
    main(
        [
            "--quick",
            "--configs",
            "memory+sqlite",
            "--rows",
            "sequential,concurrent_1",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "results.json").read_text())
    cell = report["results"]["sequential"]["memory+sqlite"]
    assert cell["ours"]["stats"]["rate"]["median"] > 0
    assert cell["theirs"]["stats"]["rate"]["median"] > 0
    if server_binary() is not None:
        peer = report["results"]["concurrent_1"]["jetstream"]["peer"]
        assert peer["stats"]["rate"]["median"] > 0, peer
    table = (tmp_path / "results.md").read_text()
    assert "| Sequential publish" in table
    assert "JetStream (file)" in table or server_binary() is None


async def test_plain_api_run_counts_every_event() -> None:
    figures = await plain_api.one_run(
        {
            "config": "memory+sqlite",
            "events": 640,
            "publishers": 64,
            "size": 99,
            "warm_up": False,
            "keep_subscription": False,
            "iterate": False,
        }
    )
    assert figures["rate"] > 0
    assert 1 <= figures["events_per_transaction"] <= 64


async def test_catch_up_checks_every_offset(tmp_path: Path) -> None:
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}") as broadcast:
        figures = await scenarios.catch_up(
            broadcast, preload=200, duration=0.5, subscribers=5, rate=500
        )
    assert figures["reconnects"] > 0
    assert figures["checked"] > 0
    assert figures["gaps"] == figures["duplicates"] == 0


@pytest.mark.parametrize("without_rowid", [False, True])
def test_sqlite_layout_commits_and_replays_every_row(tmp_path: Path, without_rowid: bool) -> None:
    line = sqlite_layout.run(str(tmp_path / "l.db"), without_rowid, 2, 10, batches=4)
    # 4 batches of 51 over 2 channels: the first channel holds 102 events.
    assert "(102 rows)" in line


async def test_channel_ratio_reports_both_logs() -> None:
    lines = await channel_ratio.measure(rounds=1, events=400)
    assert [line.split(":")[0] for line in lines] == ["file log", "memory log"]
    assert all("median" in line for line in lines)


def test_retention_scan_writes_its_figures(tmp_path: Path) -> None:
    retention_scan.main(["--channels", "2000", "--logs", "sqlite", "--out", str(tmp_path)])
    figures = json.loads((tmp_path / "retention_scan.json").read_text())["sqlite"]
    assert figures["both"]["search_ms"] > 0
    assert figures["both"]["spacing_s"] >= 1.0
