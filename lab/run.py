"""One run: a fault on a transport, with fresh channels and fresh processes.

Timeline: subscribers and publishers start together; once every subscriber is in and
every publisher connected, publishers are told to go and publish for ``duration``
seconds; after a warm-up the fault runs in cycles and stops before a quiet end (the
checker makes sure publishing overlapped it); publishers finish their retries and exit;
subscribers are given time to reach each channel's head, then are stopped (SIGTERM);
the checker reads it all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lab.app import read_records
from lab.checker import Result, check_run, read_log
from lab.faults import Fault, Settings
from lab.fleet import Fleet
from lab.report import Row

if TYPE_CHECKING:
    from lab.runner import Lab

PUBLISH_GRACE = 30.0  # seconds a publisher keeps retrying after its end
CATCH_UP = 30.0  # seconds subscribers get to reach the head once publishing ended


class Run:
    """Everything one fault x transport run needs (it is also the faults' target)."""

    def __init__(
        self,
        lab: Lab,
        index: int,
        fault: Fault,
        transport: str,
        settings: Settings,
        args: argparse.Namespace,
    ) -> None:
        self.lab = lab
        self.fault = fault
        self.transport = transport
        self.settings = settings
        self.args = args
        self.network = lab.network
        self.proxies = lab.proxies
        self.services = lab.services
        self.dir = lab.dir / f"run{index}-{fault.name}-{transport}"
        self.dir.mkdir()
        self.fleet = Fleet(self.dir)
        self.channels = [f"r{index}-a", f"r{index}-b"]
        self.subscribed: dict[str, str] = {}  # subscriber -> channel
        self.timeline: list[str] = []
        self.started = time.time()
        self.result = Result()  # process-level findings (crashes, hangs)
        self.fault_window: tuple[float, float] | None = None  # Unix times
        self._reported: set[str] = set()

    def note(self, text: str) -> None:
        line = f"{time.time() - self.started:6.1f}s {text}"
        self.timeline.append(line)
        if self.args.verbose:
            print(f"    {line}", flush=True)

    def execute(self, duration: float) -> Row:
        began = time.monotonic()
        try:
            self._run(duration)
        finally:
            self.fleet.stop_all()
        logs = asyncio.run(read_log(self.lab.log_dsn("127.0.0.1"), self.channels))
        publishers = {n: read_records(self.fleet.records(n)) for n in self.fleet.names("publisher")}
        subscribers = {
            name: (channel, read_records(self.fleet.records(name)))
            for name, channel in self.subscribed.items()
        }
        result = check_run(logs, publishers, subscribers, self.fault_window)
        result.anomalies[:0] = self.result.anomalies  # process-level findings first
        (self.dir / "timeline.txt").write_text("\n".join(self.timeline) + "\n")
        return Row(
            fault=self.fault.name,
            transport=self.transport,
            log="postgres",
            seconds=time.monotonic() - began,
            result=result,
            kills=sum(self.fleet.killed.values()),
            timeline=self.timeline,
        )

    def _run(self, duration: float) -> None:
        hosts = self.network.hosts
        for i, host in enumerate(hosts):
            transport, log = self.lab.urls(self.transport, host.gateway)
            common = ["--transport", transport, "--log", log]
            for j, start in enumerate(("replay", "live")):
                name = f"{host.name}-s{j + 1}"
                channel = self.channels[(i + j) % 2]
                self.subscribed[name] = channel
                self.fleet.add(
                    host, name, "subscriber", *common, "--channel", channel, "--start", start
                )
        go = self.dir / "go"
        for host in hosts:
            transport, log = self.lab.urls(self.transport, host.gateway)
            for j in range(2):
                name = f"{host.name}-p{j + 1}"
                self.fleet.add(
                    host, name, "publisher", "--transport", transport, "--log", log,
                    "--channels", ",".join(self.channels[j:] + self.channels[:j]),
                    "--rate", str(self.args.rate), "--go", str(go),
                    "--grace", str(PUBLISH_GRACE),
                )  # fmt: skip
        self._await_subscriptions()
        self.note("subscribers subscribed")
        # Startup takes seconds (imports, connections): publishing starts once every
        # publisher is connected, and the fault is timed from there.
        self._await_records("publisher", "ready")
        self.started = time.time()
        until = self.started + duration
        written = go.with_suffix(".tmp")  # renamed: a publisher never reads it half-written
        written.write_text(repr(until))
        written.replace(go)
        self.note("publishers go")
        time.sleep(min(4.0, duration / 3))
        began = time.time()
        self.note(f"fault {self.fault.name} begins")
        self.fault.inject(self, self.settings, until - min(2.0, duration / 6))
        self.fault_window = (began, time.time())
        self.note(f"fault {self.fault.name} ends")
        for finding in self.fleet.exited_before_kill:
            self.result.add(finding)
        self._await_publishers(until + PUBLISH_GRACE + 30)
        self._await_catch_up()
        self._stop_subscribers()
        self.note("subscribers stopped")

    def _await_subscriptions(self) -> None:
        """Wait until every subscriber has entered its subscription."""
        self._await_records("subscriber", "start")

    def _await_records(self, role: str, kind: str) -> None:
        """Wait until every process of ``role`` has written a ``kind`` record."""
        deadline = time.time() + 60
        waiting = set(self.fleet.names(role))
        while waiting and time.time() < deadline:
            waiting = {
                n for n in waiting
                if not any(r["k"] == kind for r in read_records(self.fleet.records(n)))
            }  # fmt: skip
            self._check_alive(role)
            time.sleep(0.1)
        for name in sorted(waiting):
            self.result.add(f"{name}: no {kind!r} record after 60 s")

    def _check_alive(self, role: str) -> None:
        for name in self.fleet.names(role):
            code = self.fleet.procs[name].poll()
            if code is not None and name not in self._reported:
                self._reported.add(name)
                self.result.add(f"{name}: exited by itself with status {code} (see {name}.log)")

    def _await_publishers(self, deadline: float) -> None:
        pending = set(self.fleet.names("publisher"))
        while pending and time.time() < deadline:
            for name in list(pending):
                code = self.fleet.procs[name].poll()
                if code is not None:
                    pending.discard(name)
                    if code != 0:
                        self.result.add(f"{name}: exited with status {code} (see {name}.log)")
            self._check_alive("subscriber")
            time.sleep(0.2)
        for name in sorted(pending):
            self.result.add(f"{name}: still publishing {PUBLISH_GRACE + 30:.0f} s after its end")
        self.note("publishers done")

    def _await_catch_up(self) -> None:
        """Give subscribers until ``CATCH_UP`` seconds to reach their channel's head."""
        logs = asyncio.run(read_log(self.lab.log_dsn("127.0.0.1"), self.channels))
        heads = {name: log.last_offset for name, log in logs.items()}
        deadline = time.time() + CATCH_UP
        behind = set(self.subscribed)
        while behind and time.time() < deadline:
            behind = {
                name
                for name in behind
                if _last_offset(self.fleet.records(name)) < heads.get(self.subscribed[name], 0)
            }
            time.sleep(0.2)
        self.note(f"subscribers caught up (behind: {sorted(behind) or 'none'})")

    def _stop_subscribers(self) -> None:
        self._check_alive("subscriber")
        running = [
            (name, self.fleet.procs[name])
            for name in self.fleet.names("subscriber")
            if self.fleet.procs[name].poll() is None
        ]
        for _, proc in running:
            proc.terminate()
        deadline = time.time() + 15
        for name, proc in running:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.result.add(f"{name}: did not stop within 15 s of SIGTERM")
                proc.kill()
                proc.wait()


def _last_offset(path: Path) -> int:
    """Offset of the last event a subscriber recorded (0: none yet)."""
    if not path.exists():
        return 0
    with path.open("rb") as file:
        size = file.seek(0, 2)
        file.seek(max(0, size - 16384))
        lines = file.read().split(b"\n")
    for line in reversed(lines):
        if b'"k": "ev"' in line:
            try:
                offset: int = json.loads(line)["off"]
            except ValueError:
                continue  # the first, cut line of the tail
            return offset
    return 0
