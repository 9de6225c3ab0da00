"""``scripts/lab``: set the lab up, run each fault x transport, check, report, clean up.

``scripts/lab --short`` is the CI run (a few faults x transports, short runs);
``scripts/lab --duration SECONDS`` runs every fault on every transport for that long
each. Exit status: 0 when no anomaly was found, 1 when one was, 2 when the lab could
not run (not root, a tool missing, a transport not in this build).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType

from lab import procs, report
from lab.faults import FAULTS, Settings
from lab.fleet import REPO
from lab.netns import Network
from lab.proxy import ProxyControl
from lab.run import Run
from lab.services import Nats, Postgres, Redis, Service, missing_tools

TRANSPORTS = ("redis", "redis-stream", "postgres", "nats")
DEFAULT_TRANSPORTS = "redis,redis-stream,postgres"
SERVER = {"redis": "redis", "redis-stream": "redis", "postgres": "postgres", "nats": "nats"}
# The CI run: each transport, and every kind of fault on at least one of them.
SHORT_PLAN = [
    ("partition", "redis"),
    ("kill-subscriber", "redis"),
    ("redis-restart", "redis-stream"),
    ("stall", "redis-stream"),
    ("postgres-restart", "postgres"),
    ("kill-publisher", "postgres"),
]


class Lab:
    """The hosts, servers and proxies shared by every run; ``close`` undoes it all."""

    def __init__(self, transports: list[str], hosts: int, keep: bool) -> None:
        self.transports = transports
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="bhlab-"))
        self.dir.chmod(0o755)  # the postgres user must reach its data directory
        self.network = Network(hosts, self.dir)
        self.services: dict[str, Service] = {}
        self.proxies: dict[str, ProxyControl] = {}
        self._proxy_procs: list[object] = []

    def open(self) -> None:
        self.network.create()
        postgres = Postgres(self.dir)
        postgres.init()
        self.services["postgres"] = postgres
        if any(t.startswith("redis") for t in self.transports):
            self.services["redis"] = Redis(self.dir)
        if "nats" in self.transports:
            self.services["nats"] = Nats(self.dir)
        for service in self.services.values():
            service.start()
        for host in self.network.hosts:
            control = str(self.dir / f"proxy-{host.name}.sock")
            argv = [sys.executable, "-m", "lab.proxy", "--control", control]
            for service in self.services.values():
                argv += ["--route", f"{host.gateway}:{service.port}=127.0.0.1:{service.port}"]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = procs.spawn(
                argv, log=self.dir / f"proxy-{host.name}.log", stdout_pipe=True, env=env
            )
            self._proxy_procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline() != b"ready\n":
                raise RuntimeError(f"the proxy of {host.name} did not start: see its log")
            self.proxies[host.name] = ProxyControl(control)
        asyncio.run(_migrate(self.log_dsn("127.0.0.1")))

    def port(self, service: str) -> int:
        return self.services[service].port

    def log_dsn(self, address: str) -> str:
        return f"postgresql://postgres@{address}:{self.port('postgres')}/postgres"

    def urls(self, transport: str, address: str) -> tuple[str, str]:
        """(transport URL, log URL) as seen from a host whose gateway is ``address``."""
        port = self.port(SERVER[transport])
        url = {
            "redis": f"redis://{address}:{port}/0",
            "redis-stream": f"redis-stream://{address}:{port}/0",
            "postgres": f"postgres://postgres@{address}:{port}/postgres",
            "nats": f"nats://{address}:{port}",
        }[transport]
        return url, self.log_dsn(address).replace("postgresql://", "postgresql+asyncpg://")

    def close(self) -> None:
        """Stop everything the lab started; remove its namespaces and files."""
        for proc in self._proxy_procs:
            procs.stop(proc)  # type: ignore[arg-type]
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.stop()
        self.network.destroy()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


async def _migrate(dsn: str) -> None:
    # Create the schema once, before a dozen processes all check it at start.
    from broadcast_history import EventLog

    log = EventLog(dsn.replace("postgresql://", "postgresql+asyncpg://"))
    await log.connect()
    await log.disconnect()


def _hold_off_signals() -> None:
    """From now on, SIGINT and SIGTERM only say (once) that the lab is finishing."""

    def later(_signum: int, _frame: FrameType | None) -> None:
        if not told:
            told.append(True)
            print("lab: still cleaning up; one moment", file=sys.stderr, flush=True)

    told: list[bool] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, later)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI run (well under 3 minutes)")
    parser.add_argument(
        "--duration",
        type=_positive(float),
        help="seconds of publishing per run (default 30; 7 with --short)",
    )
    parser.add_argument("--transports", default=None, help=f"default {DEFAULT_TRANSPORTS}")
    parser.add_argument("--faults", default=None, help=f"any of {','.join(FAULTS)}")
    parser.add_argument(
        "--rate", type=_positive(float), default=20.0, help="publishes/s per publisher"
    )
    # Each host takes a /30 of the instance's /24: 64 at most.
    parser.add_argument(
        "--hosts", type=_within(1, 64), default=3, help="hosts (network namespaces), 1 to 64"
    )
    parser.add_argument("--partition", type=float, default=5.0, help="seconds a link is cut")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds a proxy stalls")
    parser.add_argument("--delay", type=float, default=50.0, help="ms the delay fault adds")
    parser.add_argument("--keep", action="store_true", help="keep the lab's files")
    parser.add_argument("--out", default=str(REPO / "build" / "lab"), help="results directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each fault step")
    return parser.parse_args(argv)


def _positive(kind: type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


def _within(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, not {text}")
        return value

    return parse


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    transports = (args.transports or DEFAULT_TRANSPORTS).split(",")
    for transport in transports:
        if transport not in TRANSPORTS:
            raise _UsageError(f"unknown transport {transport!r}; use {','.join(TRANSPORTS)}")
    faults = args.faults.split(",") if args.faults else list(FAULTS)
    for fault in faults:
        if fault not in FAULTS:
            raise _UsageError(f"unknown fault {fault!r}; use {','.join(FAULTS)}")
    if args.short and not (args.faults or args.transports):
        return SHORT_PLAN
    plan = [
        (fault, transport)
        for transport in transports
        for fault in faults
        if FAULTS[fault].applies(transport)
    ]
    if not plan:
        # "0 runs, 0 anomalies" passed: a lab that tested nothing must not.
        raise _UsageError(
            f"none of the faults {','.join(faults)} applies to {','.join(transports)}"
        )
    return plan


class _UsageError(Exception):
    """The command line asks for nothing the lab can run (exit status 2)."""


def _unavailable(transports: set[str]) -> str | None:
    """Why one of ``transports`` cannot run in this build, if one cannot."""
    from broadcast_history import Broadcast

    for transport in sorted(transports):
        try:  # builds the transport from its URL; connects nothing
            Broadcast(f"{transport}://127.0.0.1:1", log="postgresql://127.0.0.1:1/none")
        except ImportError as exc:
            return str(exc)
        except ValueError:
            return (
                f"this broadcast_history has no {transport}:// transport yet; "
                "the lab will run it once the backend is in the package"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print(
            "scripts/lab needs root: it creates network namespaces and veth pairs and "
            "runs its own Postgres as the postgres user. Run it as root (sudo scripts/lab).",
            file=sys.stderr,
        )
        return 2
    try:
        plan = _plan(args)
    except _UsageError as exc:
        print(f"scripts/lab: {exc}", file=sys.stderr)
        return 2
    transports = sorted({transport for _, transport in plan})
    problem = _unavailable(set(transports))
    missing = missing_tools(transports)
    if problem or missing:
        print(f"scripts/lab cannot run: {problem or '; '.join(missing)}", file=sys.stderr)
        return 2
    duration = args.duration or (7.0 if args.short else 30.0)
    settings = Settings(partition=args.partition, stall=args.stall, delay=args.delay / 1000)

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        # The first one stops the lab; later ones must not cut its cleanup short
        # (a run's own cleanup, on the way out, included).
        _hold_off_signals()
        raise KeyboardInterrupt

    # SIGINT even when started in the background, where the shell made it ignore it.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    started = time.monotonic()
    rows: list[report.Row] = []
    lab = Lab(transports, args.hosts, args.keep)
    failure: str | None = None  # why runs of the plan are missing
    interrupted = False
    try:
        lab.open()
        print(f"lab: {args.hosts} hosts, files in {lab.dir}; {len(plan)} runs of {duration:g} s")
        for index, (fault, transport) in enumerate(plan, 1):
            run = Run(lab, index, FAULTS[fault], transport, settings, args)
            row = run.execute(duration)
            rows.append(row)
            print(
                f"[{index}/{len(plan)}] {fault} x {transport}: {row.result.acked} acked, "
                f"{row.result.delivered} deliveries, {len(row.result.anomalies)} anomalies "
                f"({row.seconds:.0f} s)",
                flush=True,
            )
    except KeyboardInterrupt:
        print("lab: interrupted; cleaning up", file=sys.stderr)
        interrupted, failure = True, "interrupted"
    except Exception as exc:
        # The lab itself broke (a server that would not start...): report what ran.
        failure = f"the lab failed: {exc!r}"
        traceback.print_exc()
    finally:
        # A second Ctrl-C while cleaning up interrupted lab.close(): namespaces, veths
        # and the directory (a Postgres data directory among them) were left behind.
        _hold_off_signals()
        lab.close()
    elapsed = time.monotonic() - started
    header = (
        f"`scripts/lab {' '.join(sys.argv[1:] if argv is None else argv)}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, "
        f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    not_done = len(plan) - len(rows)
    incomplete = None if failure is None else f"{failure}; {not_done} of {len(plan)} runs not done"
    report.write(rows, Path(args.out), header, incomplete)
    if interrupted:
        return 130
    print(f"\n{header}\n\n{report.table(rows)}")
    details = report.anomalies(rows)
    if details:
        print(f"\n{details}")
    found = sum(len(row.result.anomalies) for row in rows)
    print(f"\n{found} anomalies; results in {args.out}/results.md")
    if incomplete is not None:
        print(incomplete, file=sys.stderr)
        return 2
    return 1 if found else 0
