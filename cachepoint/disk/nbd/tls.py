"""TLS for the NBD server: NBD_OPT_STARTTLS in the spec's FORCEDTLS mode, and which addresses may be
served without it.

With ``NbdTls`` given, a TCP connection must upgrade before anything else: every option but
NBD_OPT_STARTTLS and NBD_OPT_ABORT is answered NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which
cannot be answered with an error) ends the connection. The handshake requires a client certificate
the context trusts; then ``authorize`` decides, export by export, whether the certificate's holder may
use it (a refusal is NBD_REP_ERR_POLICY with the reason). Connections on the Unix socket stay
plaintext: its mode (0600) already limits them to the daemon's user, as the spec allows a server to
be more liberal with local connections.

Protocol only, like the rest of the package: what a certificate names and who may read what is the
caller's (cachepoint/disk/nbd_access.py).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from cachepoint.errors import PlaintextNbdOffLoopback
from cachepoint.loopback import is_loopback

# (client certificate in DER, export name) -> why the client may not use that export; "" allows it.
Authorize = Callable[[bytes, str], str]


@dataclass(frozen=True)
class NbdTls:
    context: Callable[[], ssl.SSLContext]
    """Asked at each STARTTLS, so a renewed certificate is served from the next handshake on."""
    authorize: Authorize
    """Whether a client may use an export, asked whenever it names one."""


def server_context(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """A server context presenting the pair given and requiring a client certificate issued by
    ``ca_pem``'s CA (TLS 1.2 at least, as the spec asks; OpenSSL checks the client's validity dates
    at the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca_pem.decode())
    # ssl loads a key only from a path: an anonymous in-memory file, so the key never lands on disk
    # twice and the pair loaded is the one given, not whatever a renewal left in the files meanwhile.
    fd = os.memfd_create("cachepoint-nbd-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(cert_pem + b"\n" + key_pem)
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


def check_exposure(address: str, tls: bool) -> None:
    """Refuse, before anything binds, to serve disks in plaintext on an address other machines reach:
    a raw disk on the network without authentication is anyone's."""
    from cachepoint.disk.nbd.server import parse_host_port

    host, _ = parse_host_port(address)
    if tls or is_loopback(host):
        return
    raise PlaintextNbdOffLoopback(
        address,
        "only loopback addresses (127.0.0.0/8, ::1) and --nbd-socket are served in plaintext; add "
        "--nbd-tls (config nbd_tls = true) to require TLS with client certificates of the fleet",
    )
