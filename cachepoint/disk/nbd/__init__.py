"""The NBD server: wire format (protocol.py), handshake and listening (server.py), requests
(transmission.py), and what the server may hold in memory (limits.py)."""

from cachepoint.disk.nbd.limits import NbdLimits
from cachepoint.disk.nbd.protocol import BlockDevice, NbdError
from cachepoint.disk.nbd.server import NbdServer, parse_host_port, start_nbd

__all__ = ["BlockDevice", "NbdError", "NbdLimits", "NbdServer", "parse_host_port", "start_nbd"]
