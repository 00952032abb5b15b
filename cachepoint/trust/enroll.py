"""Joining the fleet: `cachepoint enroll` spends a join token for a certificate, with a key made here.

The machine has no CA yet, so it cannot verify the coordinator the usual way. It reads the chain the
enrollment port presents in a TLS handshake (which the coordinator sends whole: leaf + CA), keeps
the certificate whose SHA-256 is the one in the token, and only then talks gRPC, over TLS verified
against that CA: the token's secret and the request go only to the coordinator the token names.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cachepoint.errors import InvalidInput, RemoteRefused, Unreachable
from cachepoint.rpc import channel, replicas
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.rpc.serving import split_address
from cachepoint.trust.identity import Identity, csr_pem, key_pem, new_key
from cachepoint.trust.token import JoinToken
from cachepoint.v1 import enrollment_pb2, enrollment_pb2_grpc

HANDSHAKE_TIMEOUT = 10.0


def enroll_address(coordinator: str, token: JoinToken) -> str:
    """The enrollment port: the token's hint, else the port after the coordinator's."""
    host, port = split_address(coordinator)
    return f"{host}:{token.enroll_port or port + 1}"


def fetch_ca(address: str, fingerprint: str) -> bytes:
    """The CA certificate (PEM) in the chain ``address`` presents whose SHA-256 is ``fingerprint``."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but the pinned CA
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host.strip("[]"), port), timeout=HANDSHAKE_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=host.strip("[]")) as tls,
        ):
            # Python 3.13 names it SSLSocket.get_unverified_chain(); 3.11 has it on the C object.
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
    except (OSError, ssl.SSLError) as err:
        raise Unreachable(address, "TLS", f"{err} (is this the coordinator's enrollment port?)") from err
    seen = []
    for item in chain:
        der = item.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
        digest = hashlib.sha256(der).hexdigest()
        if digest == fingerprint:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        seen.append(digest[:16] + "…")
    raise RemoteRefused(
        address,
        "TLS",
        f"it does not present the fleet's CA named in the token ({fingerprint[:16]}…; it presents "
        f"{', '.join(seen) or 'nothing'}): not this token's coordinator",
    )


async def enroll(coordinator: str, token: JoinToken, directory: Path) -> Identity:
    """Spend ``token`` at ``coordinator`` (HOST:PORT of its main port) for an identity in ``directory``."""
    # Of several replicas, the first whose enrollment port answers; the token is spent on it alone.
    candidates = replicas.order(coordinator)
    for index, replica in enumerate(candidates):
        address = enroll_address(replica, token)
        try:
            ca_pem = await asyncio.to_thread(fetch_ca, address, token.ca_fingerprint)
            break
        except Unreachable:
            if index == len(candidates) - 1:
                raise
    key = new_key()
    request = enrollment_pb2.EnrollRequest(token_secret=token.secret, csr_pem=csr_pem(key))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(address, credentials, options=channel.OPTIONS) as ch:
        try:
            response = await enrollment_pb2_grpc.EnrollmentStub(ch).Enroll(request, timeout=UNARY_DEADLINE)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address) from err
    if ca_pem.strip() not in response.ca_certificate_pem:
        raise RemoteRefused(address, "TLS", "the CA certificates it returned lack the one it presented")
    try:
        # The bundle it returned, fetched over TLS verified against the pinned CA: during a rotation
        # of the fleet's CA, the new CA and the old one (coordinator/pki/rotation.py).
        return Identity.save(directory, key_pem(key), response.certificate_pem, response.ca_certificate_pem)
    except ValueError as err:
        raise InvalidInput(f"the certificate {address} issued is unusable: {err}") from err


async def renew(identity: Identity, coordinator: str) -> None:
    """A new key and certificate for ``identity``'s principal, asked with its current certificate."""
    key = new_key()
    request = enrollment_pb2.RenewRequest(csr_pem=csr_pem(key))
    async with grpc.aio.secure_channel(
        coordinator, identity.channel_credentials(), options=channel.OPTIONS
    ) as ch:
        try:
            response = await enrollment_pb2_grpc.EnrollmentStub(ch).Renew(request, timeout=UNARY_DEADLINE)
        except grpc.RpcError as err:
            raise from_rpc_error(err, coordinator) from err
    # With the trust bundle it hands out: after a rotation of the fleet's CA, a renewal moves this
    # identity onto the new CA and makes it trust both until the old one is retired.
    identity.replace(key_pem(key), response.certificate_pem, response.ca_certificate_pem or None)
