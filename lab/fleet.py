"""The app processes of one run, on the hosts, by name (``h1-p1``, ``h2-s2``...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lab import procs
from lab.netns import Host

REPO = Path(__file__).resolve().parent.parent


class Fleet:
    """Starts, kills and restarts the publishers and subscribers of a run."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._argv: dict[str, list[str]] = {}
        self._roles: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: dict[str, int] = {}  # name -> kill -9 count
        # Processes that had exited by themselves when a fault came to kill them.
        self.exited_before_kill: list[str] = []
        self._env = {**os.environ, "PYTHONPATH": str(REPO)}

    def records(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def add(self, host: Host, name: str, role: str, *options: str) -> None:
        """Start the app as ``role`` named ``name`` inside ``host``."""
        argv = [
            *host.exec_prefix(), sys.executable, "-m", "lab.app", role, name,
            "--records", str(self.records(name)), *options,
        ]  # fmt: skip
        self._argv[name] = argv
        self._roles[name] = role
        self._start(name)

    def _start(self, name: str) -> None:
        log = self.dir / f"{name}.log"
        self.procs[name] = procs.spawn(self._argv[name], log=log, env=self._env)

    def names(self, role: str) -> list[str]:
        return [name for name, r in self._roles.items() if r == role]

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        code = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:  # the restart would hide it: a finding of its own
            self.exited_before_kill.append(f"{name}: exited by itself with status {code}")
        self.killed[name] = self.killed.get(name, 0) + 1

    def restart(self, name: str) -> None:
        self._start(name)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            procs.stop(proc, signal.SIGKILL)
