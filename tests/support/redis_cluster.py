"""A throwaway Redis Cluster for the tests: three masters on free ports in a tmp dir.

Each node is a ``redis-server --cluster-enabled yes`` process; ``redis-cli --cluster
create`` assigns the slots. No replicas: killing a master leaves its slots uncovered
until it is started again, which is the harsher fault (nothing takes its channels
over). Without the binaries the tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import pytest

_READY_TIMEOUT = 30.0


def _binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server and redis-cli are needed to start a Redis Cluster"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: services are required)")
        pytest.skip(message)
    return server, cli


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A port free for a client and for its cluster bus (the port + 10000)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < 55_000 and _free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterNodes:
    """Three Redis Cluster masters; each can be killed and started again on its port."""

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 1000) -> None:
        self.server, self.cli = _binaries()
        self.node_timeout_ms = node_timeout_ms
        self._tmp = tempfile.TemporaryDirectory(prefix="bh-redis-cluster-")
        self.dir = Path(self._tmp.name)
        self.ports: list[int] = []
        while len(self.ports) < masters:
            port = free_cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``redis-cluster://`` URL naming every node."""
        return "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start_node(self, port: int) -> None:
        """Start (or restart) the node of ``port``; it keeps its nodes.conf, so it rejoins."""
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        settings = {
            "port": str(port),
            "bind": "127.0.0.1",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(self.node_timeout_ms),
            "save": "",
            "appendonly": "no",
            "dir": str(node_dir),
            "logfile": "redis.log",
        }
        args = [self.server]
        for name, value in settings.items():
            args += [f"--{name}", value]
        self.processes[port] = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _READY_TIMEOUT
        while self.command(port, "PING") != "PONG":
            if time.monotonic() > deadline or self.processes[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} did not start")
            time.sleep(0.05)

    def kill_node(self, port: int) -> None:
        """SIGKILL the node of ``port`` (a crash: no goodbye to clients or peers)."""
        process = self.processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait until every node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in self.command(p, "CLUSTER", "INFO") for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill_node(port)
        self._tmp.cleanup()

    def command(self, port: int, *command: str) -> str:
        """``redis-cli -p port command...``'s output."""
        done = subprocess.run(
            [self.cli, "-p", str(port), *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout.strip()

    def __enter__(self) -> RedisClusterNodes:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def running_cluster() -> Iterator[RedisClusterNodes]:
    """A fresh three-master cluster for the duration of the block."""
    with RedisClusterNodes() as cluster:
        yield cluster
