"""The parts of HTTP with TLS that need no daemon: bearer tokens as the fleet's CA signs them, the
loopback rule, and a server's TLS context serving a renewed certificate from the next handshake (a
real handshake on loopback)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cachepoint.errors import InvalidInput
from cachepoint.http.tls import PlaintextOffLoopback, ServerTls, check_plaintext_listen, is_loopback
from cachepoint.trust.bearer import BearerToken, TokenInvalid
from cachepoint.trust.identity import key_pem, new_key
from cachepoint.trust.principal import PEER_TLS_NAME, Principal, Role
from coordinator.pki.bearer import issue
from coordinator.pki.ca import CertificateAuthority

ALICE = Principal("alice", (Role("user", "alice"),))


def test_a_token_names_its_principal_and_only_the_fleets_ca_makes_one_that_verifies(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "fleet")
    other = CertificateAuthority.create(tmp_path / "other")
    text = BearerToken.issue(ca.key, ALICE, timedelta(hours=8), time.time())
    token = BearerToken.verify(text, ca.cert)
    assert token.principal.name == "alice" and token.principal.roles == (Role("user", "alice"),)
    assert token.expires - token.issued == 8 * 3600 and len(token.serial) == 16
    # The issue time is what revocations compare, as for a certificate.
    assert token.principal.issued == datetime.fromtimestamp(token.issued, UTC)

    with pytest.raises(TokenInvalid, match="not the fleet CA's"):
        BearerToken.verify(BearerToken.issue(other.key, ALICE, timedelta(hours=1), time.time()), ca.cert)
    body, _, signature = text.removeprefix("cpbearer1.").partition(".")
    import base64

    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = ["auditor"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(TokenInvalid, match="forged"):
        BearerToken.verify(f"cpbearer1.{forged}.{signature}", ca.cert)
    with pytest.raises(TokenInvalid, match="expired"):
        BearerToken.verify(BearerToken.issue(ca.key, ALICE, timedelta(seconds=1), time.time() - 10), ca.cert)
    for junk in ("", "cpjoin1.abc", "cpbearer1.", "cpbearer1.x.y", "cpbearer1." + "A" * 5000):
        with pytest.raises(TokenInvalid):
            BearerToken.verify(junk, ca.cert)


def test_the_token_command_refuses_a_bad_role_a_long_ttl_and_a_directory_without_a_ca(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path / "data")
    with pytest.raises(InvalidInput, match="role"):
        issue(tmp_path / "data", "alice", "superuser", "8h")
    with pytest.raises(InvalidInput, match="30d"):
        issue(tmp_path / "data", "alice", "user:alice", "31d")
    with pytest.raises(Exception, match="no CA"):
        issue(tmp_path / "empty", "alice", "user:alice", "8h")


def test_only_loopback_addresses_may_serve_plaintext() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        check_plaintext_listen(f"{host}:0", "--http-tls")
    for host in ("0.0.0.0", "::", "[::]", "10.1.2.3", "192.0.2.1", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(PlaintextOffLoopback, match="--http-tls"):
            check_plaintext_listen(f"{host}:7480", "--http-tls")


def _pair(ca: CertificateAuthority, name: str) -> tuple[bytes, bytes, int]:
    key = new_key()
    cert = ca.issue(key.public_key(), Principal(name, (Role("node"),)), timedelta(hours=1))
    return key_pem(key), cert.public_bytes(serialization.Encoding.PEM), cert.serial_number


async def _served_serial(port: int, ca_pem: bytes) -> int:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=PEER_TLS_NAME)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewed_certificate_is_served_from_the_next_handshake_without_a_restart(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.create(tmp_path / "fleet")
    key, cert, first = _pair(ca, "n1")
    current = [(1, key, cert)]
    tls = ServerTls(lambda: current[0], ca.cert_pem)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await _served_serial(port, ca.cert_pem) == first
        key, cert, renewed = _pair(ca, "n1")
        current[0] = (2, key, cert)
        assert await _served_serial(port, ca.cert_pem) == renewed
        assert await _served_serial(port, ca.cert_pem) == renewed
    finally:
        server.close()
        await server.wait_closed()
