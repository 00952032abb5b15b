"""The NBD server: wire format (protocol.py), handshake and listening (server.py), requests
(transmission.py)."""

from cachepoint.disk.nbd.protocol import BlockDevice, NbdError
from cachepoint.disk.nbd.server import NbdServer, parse_host_port, start_nbd

__all__ = ["BlockDevice", "NbdError", "NbdServer", "parse_host_port", "start_nbd"]
