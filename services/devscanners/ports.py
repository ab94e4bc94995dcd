"""Loopback listening ports for test and benchmark servers.

Ports come from below the kernel's ephemeral range (32768+ on Linux), where no outgoing
connection's source port can take one, and each is handed out once per process. Letting the
kernel pick (bind to port 0) draws from the ephemeral range: a busy test run's own client
connections use those ports too, and the same port can come back twice. Each process starts
at a pid-dependent offset so that two runs at once rarely meet. The workers of one parallel
test run (pytest-xdist sets PYTEST_XDIST_WORKER and PYTEST_XDIST_WORKER_COUNT) each take a
slice of the range of their own, so they never hand out the same port.
"""

from __future__ import annotations

import os
import socket


def _port_range() -> tuple[int, int]:
    low, high = 20000, 32000
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return low, high
    width = (high - low) // count
    low += int(worker[2:]) * width
    return low, low + width


PORT_RANGE = _port_range()
_next_port = PORT_RANGE[0] + (os.getpid() * 7919) % (PORT_RANGE[1] - PORT_RANGE[0])


def free_port() -> int:
    """A loopback TCP port nothing listens on, not handed out before in this process."""
    global _next_port
    low, high = PORT_RANGE
    for _ in range(high - low):
        port = _next_port
        _next_port = low + (_next_port + 1 - low) % (high - low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")
