"""Loopback ports for the servers tests start themselves."""

from __future__ import annotations

import socket

# Below the kernel's ephemeral ports, as the lab's: see there.
from lab.procs import free_port

__all__ = ["accepts", "free_port"]


def accepts(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
