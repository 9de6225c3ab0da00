"""The hosts: network namespaces joined to the root namespace by veth pairs.

Host ``i`` of lab instance ``n`` is the namespace ``bhlab<n>-h<i>``; its veth pair is
``bl<n>h<i>`` (root side, address ``10.231.<n>.<4i-3>/30``) and ``eth0`` inside
(``10.231.<n>.<4i-2>/30``). A namespace has only that connected route and no default
route, and the root namespace does not forward (``ip_forward`` stays as it is), so
nothing sent from a host can leave the machine: it reaches the root-side address,
where the host's proxy listens, or nowhere.

Each lab instance takes the first free ``n``; a state directory per instance records
its owner's pid and its files, so a later lab can remove what a killed one left behind
(its child processes die with it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab import procs

PREFIX = "bhlab"
STATE = Path("/run/bhlab")
SUBNET = "10.231"


@dataclass(frozen=True)
class Host:
    """One host: its namespace, its veth ends and their addresses."""

    name: str  # h1, h2, ...
    netns: str
    veth: str  # root side; "ip link set <veth> down" cuts the host off
    gateway: str  # root-side address: where the host reaches the services
    address: str  # the host's own address

    def exec_prefix(self) -> list[str]:
        """Prefix that runs a command inside the host's namespace."""
        return ["ip", "netns", "exec", self.netns]


def _ip(*args: str) -> None:
    procs.run(["ip", *args])


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


class Network:
    """The lab's hosts; :meth:`destroy` removes everything :meth:`create` made."""

    def __init__(self, count: int, workdir: Path) -> None:
        self.count = count
        self.workdir = workdir  # removed by a later lab if this one is killed
        self.instance: int | None = None
        self.hosts: list[Host] = []

    def create(self) -> None:
        sweep_stale()
        STATE.mkdir(parents=True, exist_ok=True)
        taken = _namespaces()
        for n in range(1, 250):
            if any(ns.startswith(f"{PREFIX}{n}-h") for ns in taken):
                # Namespaces of that name that no lab records: someone else's. Taken
                # anyway, the lab failed to add its own, then removed theirs (and
                # killed what ran inside) as if they were its.
                continue
            try:
                (STATE / str(n)).mkdir()  # atomic: one lab per instance number
            except FileExistsError:
                continue
            self.instance = n
            break
        else:
            raise RuntimeError(f"no free lab instance number under {STATE}")
        (STATE / str(n) / "workdir").write_text(str(self.workdir))
        (STATE / str(n) / "owner").write_text(str(os.getpid()))
        for i in range(1, self.count + 1):
            host = Host(
                name=f"h{i}",
                netns=f"{PREFIX}{n}-h{i}",
                veth=f"bl{n}h{i}",
                gateway=f"{SUBNET}.{n}.{4 * i - 3}",
                address=f"{SUBNET}.{n}.{4 * i - 2}",
            )
            self.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip(*f"link add {host.veth} type veth peer name eth0 netns {host.netns}".split())
            _ip("addr", "add", f"{host.gateway}/30", "dev", host.veth)
            _ip("link", "set", host.veth, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/30", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")

    def cut(self, host: Host) -> None:
        """Partition ``host``: its link goes down, packets are lost, sockets stay open."""
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        """End a partition; the connected routes come back with the link."""
        _ip("link", "set", host.veth, "up")

    def destroy(self) -> None:
        """Remove the namespaces and veths; kill what still runs inside them."""
        if self.instance is None:
            return
        _remove_instance(self.instance, files=False)  # the lab keeps or removes them
        self.instance = None
        self.hosts = []


def _remove_instance(n: int, *, files: bool = True) -> None:
    for netns in sorted(ns for ns in _namespaces() if ns.startswith(f"{PREFIX}{n}-h")):
        # Only the lab's own processes can be inside its namespaces.
        pids = subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        veth = f"bl{n}h{netns.rsplit('-h', 1)[1]}"
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
    state = STATE / str(n)
    with contextlib.suppress(OSError):
        workdir = Path((state / "workdir").read_text())
        if files and workdir.name.startswith("bhlab-"):
            shutil.rmtree(workdir, ignore_errors=True)
    for name in ("workdir", "owner"):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    with contextlib.suppress(OSError):
        state.rmdir()


def sweep_stale() -> None:
    """Remove what labs killed before their clean-up left (their owner is gone)."""
    if not STATE.is_dir():
        return
    for entry in STATE.iterdir():
        if not entry.name.isdigit():
            continue
        owner = entry / "owner"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            # Just claimed by a lab that has not written its pid yet, or left empty.
            if time.time() - entry.stat().st_mtime < 60:
                continue
            pid = 0
        if pid and procs.alive(pid):
            continue
        _remove_instance(int(entry.name))
