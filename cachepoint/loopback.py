"""Whether a listen address stays on this machine: servers that speak plaintext (HTTP and NBD without
TLS) may bind only there, so that nothing on the network reaches them unauthenticated."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (127.0.0.0/8, ::1). A name is resolved;
    one that does not resolve is not loopback (the bind would fail anyway, and a refusal says more)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    # A scoped IPv6 address comes back as "fe80::1%eth0": the scope is not part of the address.
    addresses = [str(info[4][0]).split("%")[0] for info in found]
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)
