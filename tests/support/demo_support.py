"""Helpers shared by the demo tests: free ports and waiting for a demo process."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx


def wait_for_server(base: str, process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Poll the demo at ``base`` until it answers; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise RuntimeError(f"the demo exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{base}/api/info", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the demo did not start in time")
