"""TLS for the HTTP servers (the daemon's and the coordinator's REST API), and the rule that without it
they listen on loopback only.

The server asks for a client certificate of the fleet's CA but does not require one
(ssl.CERT_OPTIONAL): a client may authenticate with a bearer token instead, and one with neither gets
a 401 naming what is missing (cachepoint/http/auth.py), which a gRPC handshake cannot say. A
certificate that is presented must chain to the fleet's CA, or the handshake fails (OpenSSL gives no
way to take an unverified one). Its validity dates are *not* checked in the handshake
(X509_V_FLAG_NO_CHECK_TIME) but by auth.py on every request, so an expired certificate gets a 401
saying when it expired, not a TLS alert; the cost is that nothing but auth.py may trust a peer
certificate of this context.

The served pair is read from ``pair()`` (generation, key PEM, certificate chain PEM) at each handshake
(server-name callback: a comparison) and a new context is made when the generation changed, so a
renewed certificate is served from the next connection on, without a restart. Keys are loaded through
a memfd: the coordinator's key is never written to disk.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable

from cachepoint.errors import InvalidInput
from cachepoint.loopback import is_loopback

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); the ssl module takes any flag bits.
NO_CHECK_TIME = 0x200000

Pair = Callable[[], tuple[int, bytes, bytes]]  # (generation, key PEM, certificate chain PEM)


class PlaintextOffLoopback(InvalidInput):
    """refusing to serve HTTP without TLS on {}: {} is not a loopback address, and plaintext HTTP listens
    on loopback only (127.0.0.1, ::1); add {} (clients then need a certificate or a token of the
    fleet) or listen on 127.0.0.1"""


def check_plaintext_listen(listen: str, option: str) -> None:
    """Refuse a plaintext HTTP server on ``listen`` (HOST:PORT) unless HOST is loopback; called before
    anything is bound."""
    host, sep, _ = listen.rpartition(":")
    if sep and host and not is_loopback(host):
        raise PlaintextOffLoopback(listen, host, option)


def _load_pair(context: ssl.SSLContext, key_pem: bytes, chain_pem: bytes) -> None:
    fd = os.memfd_create("cachepoint-http-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(chain_pem + b"\n" + key_pem)
        while data:
            data = data[os.write(fd, data) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class ServerTls:
    def __init__(self, pair: Pair, ca_pem: bytes) -> None:
        self._pair = pair
        self._ca = ca_pem.decode()
        self._lock = threading.Lock()
        generation, key, chain = pair()
        self.generation = generation
        self.context = self._context(key, chain)
        self._current = self.context
        self.context.sni_callback = self._choose

    def _context(self, key: bytes, chain: bytes) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= NO_CHECK_TIME  # type: ignore[assignment]
        context.load_verify_locations(cadata=self._ca)
        _load_pair(context, key, chain)
        return context

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """Every handshake: the context of the current pair (a new one after a renewal)."""
        generation, key, chain = self._pair()
        with self._lock:
            if generation != self.generation:
                self._current = self._context(key, chain)
                self.generation = generation
            current = self._current
        if current is not self.context:
            connection.context = current
