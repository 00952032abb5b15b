"""An identity on disk: this machine's private key (0600, made here, never sent), its certificate and
the fleet's CA certificate, in STORE/identity/ for a node or in --identity DIR / $CACHEPOINT_IDENTITY
for a person or a tool. It also makes the gRPC credentials that present it.

A renewal replaces key and certificate in place (files and memory): channels made afterwards present
the new pair, and a server built with ``server_credentials`` serves it from the next handshake on.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cachepoint import atomic
from cachepoint.console import warn
from cachepoint.errors import InvalidInput
from cachepoint.trust.location import (  # noqa: F401 - names callers import from here too
    CA_FILE,
    CERT_FILE,
    ENV_IDENTITY,
    KEY_FILE,
    STORE_IDENTITY,
    identity_dir,
)
from cachepoint.trust.principal import Principal, principal_of

RENEW_AT = 2 / 3  # of a certificate's lifetime: leaves a third to retry in while the coordinator is away


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key: ec.EllipticCurvePrivateKey, name: str = "cachepoint") -> bytes:
    """A request that proves possession of ``key``; the coordinator decides what the certificate
    names (from the token or the current certificate), never the subject asked for here."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def ca_fingerprint(ca_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Put a small file in place whole, with ``mode`` from its first byte on (a key is never readable
    by others, not even for a moment): cachepoint/atomic.py's temp, fsync, rename."""
    with atomic.new_file(path, force=True, mode=mode) as fd, os.fdopen(fd, "wb", closefd=False) as f:
        f.write(data)


class Identity:
    def __init__(self, directory: Path, key: bytes, cert: bytes, ca: bytes) -> None:
        self.directory = directory
        self._lock = threading.Lock()  # the server's certificate fetcher runs on gRPC's threads
        self.generation = 0  # grows with each pair set: channels made before present the old one
        self._set(key, cert, ca)

    def _set(self, key: bytes, cert: bytes, ca: bytes) -> None:
        parsed = x509.load_pem_x509_certificate(cert)
        with self._lock:
            self.key_pem, self.cert_pem, self.ca_pem = key, cert, ca
            self.certificate = parsed
            self.principal: Principal = principal_of(parsed)
            self.generation += 1
            self._channel_credentials: grpc.ChannelCredentials | None = None

    @classmethod
    def load(cls, directory: Path) -> Identity:
        staged = directory / (CERT_FILE + ".new")
        if staged.exists() and not (directory / (KEY_FILE + ".new")).exists():
            staged.replace(directory / CERT_FILE)  # a renewal stopped between its two renames
        try:
            key = (directory / KEY_FILE).read_bytes()
            cert = (directory / CERT_FILE).read_bytes()
            ca = (directory / CA_FILE).read_bytes()
        except OSError as err:
            raise InvalidInput(
                f"identity {directory} is incomplete ({err.strerror}: {err.filename}); "
                "enroll with `cachepoint enroll`"
            ) from err
        try:
            return cls(directory, key, cert, ca)
        except ValueError as err:
            raise InvalidInput(f"identity {directory}: {err}") from err

    @classmethod
    def save(cls, directory: Path, key: bytes, cert: bytes, ca: bytes) -> Identity:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = cls(directory, key, cert, ca)
        identity._write()
        return identity

    def _write(self) -> None:
        # Key and certificate must change together: both are staged as *.new, then renamed key first.
        # A crash between the two renames leaves cert.pem.new beside a key it matches; load() finishes.
        write_file(self.directory / CA_FILE, self.ca_pem, 0o644)
        write_file(self.directory / (KEY_FILE + ".new"), self.key_pem, 0o600)
        write_file(self.directory / (CERT_FILE + ".new"), self.cert_pem, 0o644)
        (self.directory / (KEY_FILE + ".new")).replace(self.directory / KEY_FILE)
        (self.directory / (CERT_FILE + ".new")).replace(self.directory / CERT_FILE)

    def replace(self, key: bytes, cert: bytes, ca: bytes | None = None) -> None:
        """A renewed pair (and, when given, the CA certificates to trust from now on): written, then
        served and presented from now on."""
        ca = ca or self.ca_pem
        Identity(self.directory, key, cert, ca)._write()  # parsed first: a bad one is refused
        self._set(key, cert, ca)

    def current(self) -> tuple[int, bytes, bytes]:
        """(generation, key PEM, certificate PEM), one consistent pair: what an HTTP server with TLS
        serves (cachepoint/http/tls.py), the renewed pair from the handshake after a renewal."""
        with self._lock:
            return self.generation, self.key_pem, self.cert_pem

    # -- lifetime ----------------------------------------------------------------------------------

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def renew_at(self) -> datetime:
        issued = self.principal.issued or self.certificate.not_valid_before_utc
        return issued + (self.not_after - issued) * RENEW_AT

    def seconds_to_renewal(self) -> float:
        return (self.renew_at() - datetime.now(UTC)).total_seconds()

    # -- gRPC --------------------------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        with self._lock:
            if self._channel_credentials is None:
                self._channel_credentials = grpc.ssl_channel_credentials(
                    root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
                )
            return self._channel_credentials

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS: a client must present a certificate of the fleet's CA. The pair is fetched again at
        each handshake after a renewal, so the server never restarts for one."""
        served = [self.generation]

        def current() -> grpc.ServerCertificateConfiguration:
            with self._lock:
                return grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], self.ca_pem)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if self.generation == served[0]:
                return None
            served[0] = self.generation
            return current()

        return grpc.dynamic_ssl_server_credentials(current(), fetch, require_client_authentication=True)


def activate(flag: str | None, store: Path | None) -> Identity | None:
    """Load the identity this process presents (see identity_dir) and make every channel present it;
    None, and plaintext, when there is none."""
    from cachepoint.rpc import channel

    directory = identity_dir(flag, store)
    if directory is None:
        return None
    identity = Identity.load(directory)
    if identity.not_after <= datetime.now(UTC):
        warn(
            f"identity {directory}: the certificate of {identity.principal.name!r} expired at "
            f"{identity.not_after:%Y-%m-%d %H:%M:%S} UTC: the fleet refuses it "
            "(enroll again with a new token)"
        )
    channel.use_identity(identity)
    return identity
