"""The NBD server: wire format (protocol.py), handshake and listening (server.py), requests
(transmission.py), what the server may hold in memory (limits.py), and TLS (tls.py)."""

from cachepoint.disk.nbd.limits import NbdLimits
from cachepoint.disk.nbd.protocol import BlockDevice, NbdError
from cachepoint.disk.nbd.server import NbdServer, parse_host_port, start_nbd
from cachepoint.disk.nbd.tls import NbdTls, check_exposure

__all__ = [
    "BlockDevice",
    "NbdError",
    "NbdLimits",
    "NbdServer",
    "NbdTls",
    "check_exposure",
    "parse_host_port",
    "start_nbd",
]
