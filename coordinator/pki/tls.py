"""The coordinator's own TLS: a key made at each start (never written), a certificate issued by the
fleet's CA for the hosts it is reached by, renewed at 2/3 of its lifetime from inside the handshake
(grpc asks the fetcher before each one), so the coordinator never restarts for it.

The chain served is leaf + CA: a machine enrolling has no CA yet and reads it from the handshake.
During a CA rotation (coordinator/pki/rotation.py) the leaf comes from the retiring CA and client
certificates of both CAs are accepted; a rotation step is picked up at the next handshake.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import grpc
from cryptography.hazmat.primitives import serialization

from cachepoint.trust.identity import RENEW_AT, key_pem, new_key
from cachepoint.trust.principal import BACKDATE
from coordinator.pki.rotation import Authorities, LiveAuthorities


class CoordinatorTls:
    def __init__(self, authorities: LiveAuthorities, hosts: list[str], lifetime: timedelta) -> None:
        self.authorities = authorities
        self.hosts = hosts
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self.generation = 0
        self._issue(authorities.current)

    def _issue(self, current: Authorities) -> None:
        key = new_key()
        cert = current.serving.issue_server(key.public_key(), self.hosts, self.lifetime)
        issued = cert.not_valid_before_utc + BACKDATE
        self.renew_at = issued + (cert.not_valid_after_utc - issued) * RENEW_AT
        chain = cert.public_bytes(serialization.Encoding.PEM) + current.serving.cert_pem
        self.pair = (key_pem(key), chain)
        self.client_cas = current.bundle_pem
        self.issued_under = self.authorities.generation
        self.generation += 1

    def current(self) -> tuple[int, bytes, bytes]:
        """(generation, key PEM, chain PEM), renewed first when due: the HTTP server's TLS
        (cachepoint/http/tls.py) serves the same certificate as the gRPC ports."""
        with self._lock:
            if datetime.now(UTC) >= self.renew_at:
                self._issue()
            return self.generation, self.pair[0], self.pair[1]

    def _config(self, client_ca: bool) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([self.pair], self.client_cas if client_ca else None)

    def credentials(self, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Mutual TLS for the main port; TLS without client certificates for the enrollment port."""
        served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                current = self.authorities.refresh()
                if datetime.now(UTC) >= self.renew_at or self.issued_under != self.authorities.generation:
                    self._issue(current)
                if served[0] == self.generation:
                    return None
                served[0] = self.generation
                return self._config(require_client_certificate)

        return grpc.dynamic_ssl_server_credentials(
            self._config(require_client_certificate),
            fetch,
            require_client_authentication=require_client_certificate,
        )
