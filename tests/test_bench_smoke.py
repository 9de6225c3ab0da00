"""The benchmark suite runs end to end (smallest sizes, in-process configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("broadcaster", reason="the benchmarks compare with broadcaster 0.3.1")

from bench import scenarios
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
    assert "| Sequential publish" in (tmp_path / "results.md").read_text()


async def test_catch_up_checks_every_offset(tmp_path: Path) -> None:
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}") as broadcast:
        figures = await scenarios.catch_up(
            broadcast, preload=200, duration=0.5, subscribers=5, rate=500
        )
    assert figures["reconnects"] > 0
    assert figures["checked"] > 0
    assert figures["gaps"] == figures["duplicates"] == 0
