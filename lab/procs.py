"""Child processes of the lab: they die with it, and are stopped only by their own id."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# Linux starts ephemeral ports at 32768 (net.ipv4.ip_local_port_range).
_EPHEMERAL = 32768
_LOWEST = 20000


def _die_with_parent() -> None:
    # Runs in the child between fork and exec, after any change of user (which
    # would clear the setting): if the lab itself is killed, so is the child.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    user: str | None = None,
    stdout_pipe: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (Ctrl-C reaches only the lab).

    Args:
        argv: The command.
        log: File receiving its stderr (and stdout unless ``stdout_pipe``), appended.
        user: Run as this OS user (Postgres refuses to run as root).
        stdout_pipe: Give the caller a pipe of its stdout.
        env: Environment; default: the lab's own.
    """
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # spawn from the main thread only: see above
            env=env,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Send ``sig`` to ``proc`` (by its pid), then SIGKILL it if it has not exited."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def free_port() -> int:
    """A TCP port free on every address right now, below the kernel's range of
    ephemeral ports: a server restarted on it (a fault, a restart test) must not find
    it taken by a client's outgoing connection, whose local port comes from that range
    (bind(0) picks from it too)."""
    for _ in range(100):
        port = random.randrange(_LOWEST, _EPHEMERAL)
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_LOWEST}..{_EPHEMERAL - 1}")


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Return once ``host:port`` accepts connections.

    Raises:
        RuntimeError: ``proc`` exited first, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")
        time.sleep(0.05)


def run(argv: Sequence[str], *, user: str | None = None) -> None:
    """Run a short set-up command, raising with its output if it fails."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, user=user, group=user, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout}")


def alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
