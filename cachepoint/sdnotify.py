"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram to $NOTIFY_SOCKET.

A unit of `Type=notify` counts as started only once the daemon says `READY=1`, so units ordered after
it (and `systemctl start`, and Ansible) wait until the ports are really bound. Outside systemd the
variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

ENV_SOCKET = "NOTIFY_SOCKET"

log = logging.getLogger("cachepoint.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to the service manager; False when there is none to tell.

    A failure is logged, never raised: systemd then reports the start as timed out, which names the
    unit; raising here would stop a daemon that serves fine.
    """
    address = os.environ.get(ENV_SOCKET, "")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket: its name starts with a NUL byte
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("%s=%r is neither a path nor an abstract socket: not notified", ENV_SOCKET, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("could not tell the service manager %s at %s: %s", state, os.environ[ENV_SOCKET], err)
        return False
    return True


def notify_ready() -> bool:
    return notify("READY=1")
