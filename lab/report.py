"""The results table: one row per run (fault x transport x log)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.checker import Result

HEADER = (
    "| fault | transport | log | publishes acked | publish errors (retried) "
    "| never acked (stored) | events stored | deliveries checked | subscriber errors "
    "| kills | anomalies |"
)


@dataclass
class Row:
    """The outcome of one run."""

    fault: str
    transport: str
    log: str
    seconds: float
    result: Result
    kills: int = 0
    timeline: list[str] = field(default_factory=list)

    def cells(self) -> str:
        r = self.result
        return (
            f"| {self.fault} | {self.transport} | {self.log} | {r.acked:,} "
            f"| {r.publish_errors:,} | {r.unacked:,} ({r.unacked_stored:,}) | {r.stored:,} "
            f"| {r.delivered:,} | {r.subscriber_errors:,} | {self.kills} "
            f"| **{len(r.anomalies)}** |"
        )


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + " --- |" * HEADER.count(" |")]
    lines += [row.cells() for row in rows]
    return "\n".join(lines)


def anomalies(rows: list[Row], limit: int = 20) -> str:
    """The anomalies of each run, at most ``limit`` per run."""
    out = []
    for row in rows:
        found = row.result.anomalies
        if not found:
            continue
        out.append(f"{row.fault} x {row.transport}: {len(found)} anomalies")
        out += [f"  - {a}" for a in found[:limit]]
        if len(found) > limit:
            out.append(f"  - ... {len(found) - limit} more")
    return "\n".join(out)


def write(rows: list[Row], directory: Path, header: str, incomplete: str | None = None) -> None:
    """Save ``results.md`` and ``results.json`` in ``directory``.

    ``incomplete`` says why runs of the plan are missing (the lab failed or was
    interrupted): the files say it too, so a partial table is not taken for a run
    of the whole plan, nor an old one left in place for this run's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    text = f"{header}\n\n"
    if incomplete is not None:
        text += f"**Incomplete: {incomplete}.**\n\n"
    text += f"{table(rows)}\n"
    details = anomalies(rows, limit=200)
    if details:
        text += f"\n```\n{details}\n```\n"
    (directory / "results.md").write_text(text)
    (directory / "results.json").write_text(
        json.dumps(
            {"header": header, "incomplete": incomplete, "runs": [asdict(row) for row in rows]},
            indent=1,
        )
    )
