"""Loopback ports for servers that must be told their port before they start (a coordinator that
comes back at the same address after a restart, PostgreSQL, rsync's daemon, the deploy's inventory).

A port picked by binding port 0 and releasing it comes from the kernel's ephemeral range, where it is
free again for anyone: the next outgoing connection of any process on the machine may take it as its
source port, and a client that keeps dialling a stopped server at that port can even connect to itself
(TCP simultaneous open) and hold it. The ports here come from below the ephemeral range, which the
kernel never hands out on its own, so only another explicit pick can collide, and the bind check
catches that at the time of the pick.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20000  # above the well-known and registered ports that services on a machine tend to take
_given: set[int] = set()  # this process never hands out the same port twice


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def quiet_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range (see the module's docstring)."""
    highest = _ephemeral_start() - 1
    if highest <= LOWEST:
        raise RuntimeError(f"the ephemeral port range starts at {highest + 1}: no quiet ports above {LOWEST}")
    for _ in range(1000):
        port = random.randint(LOWEST, highest)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port on {host} between {LOWEST} and {highest} after 1000 tries")
