"""The NBD server's TLS on the wire (the spec's FORCEDTLS mode) and multi-conn, driven by a raw client
over real TLS handshakes: what is answered before NBD_OPT_STARTTLS, what after, and the export checks."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachepoint.disk.nbd import NbdTls
from cachepoint.disk.nbd import protocol as nbd
from cachepoint.disk.nbd.tls import server_context
from cachepoint.trust.principal import PEER_TLS_NAME, principal_of_pem
from tests.fleet import issue_identity
from tests.test_nbd_protocol import (
    TIMEOUT,
    MemoryDevice,
    ServerThread,
    assert_closed_by_server,
    connect,
    go,
    greet,
    read_option_reply,
    recv_exactly,
    request,
    send_option,
    serve,  # noqa: F401 - the fixture
)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "fleet-ca"
    return {
        "node": issue_identity(ca, tmp_path / "node", "node-a", "node"),
        "alice": issue_identity(ca, tmp_path / "alice", "alice", "user:alice"),
        "stranger": issue_identity(tmp_path / "other-ca", tmp_path / "stranger", "alice", "user:alice"),
    }


def read(path: Path) -> bytes:
    return path.read_bytes()


def only_alice_reads_mine(certificate: bytes, export: str) -> str:
    name = principal_of_pem(ssl.DER_cert_to_PEM_cert(certificate).encode()).name
    return "" if export == "mine" and name == "alice" else f"{name} may not use {export}"


@pytest.fixture
def tls_server(serve: Any, pki: dict[str, Path]) -> Iterator[ServerThread]:  # noqa: F811
    node = pki["node"]
    context = server_context(*(read(node / f) for f in ("key.pem", "cert.pem", "ca.pem")))
    exports = {"mine": MemoryDevice(8192, read_only=True), "theirs": MemoryDevice(8192)}
    exports["mine"].data[:5] = b"hello"
    yield serve(exports, tls=NbdTls(lambda: context, only_alice_reads_mine))


def upgrade(sock: socket.socket, identity: Path, trust: Path) -> ssl.SSLSocket:
    send_option(sock, nbd.OPT_STARTTLS)
    assert read_option_reply(sock)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ACK)
    context = ssl.create_default_context(cafile=str(trust / "ca.pem"))
    context.load_cert_chain(str(identity / "cert.pem"), str(identity / "key.pem"))
    return context.wrap_socket(sock, server_hostname=PEER_TLS_NAME)


def go_reply(sock: socket.socket, name: str) -> tuple[int, bytes]:
    raw = name.encode()
    send_option(sock, nbd.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    _, reply, payload = read_option_reply(sock)
    return reply, payload


def test_before_starttls_every_option_but_starttls_and_abort_is_answered_tls_required(tls_server, pki):
    sock = greet(tls_server.port)
    with sock:
        for option in (nbd.OPT_LIST, nbd.OPT_STRUCTURED_REPLY, nbd.OPT_INFO, nbd.OPT_GO, 0xDEAD):
            send_option(sock, option)
            option_back, reply, message = read_option_reply(sock)
            assert (option_back, reply) == (option, nbd.REP_ERR_TLS_REQD) and b"requires TLS" in message
        send_option(sock, nbd.OPT_STARTTLS, b"data")
        assert read_option_reply(sock)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID)
        send_option(sock, nbd.OPT_ABORT)
        assert read_option_reply(sock)[:2] == (nbd.OPT_ABORT, nbd.REP_ACK)
    # NBD_OPT_EXPORT_NAME cannot be answered with an error: the connection ends.
    sock = greet(tls_server.port)
    with sock:
        send_option(sock, nbd.OPT_EXPORT_NAME, b"mine")
        assert_closed_by_server(sock)


def test_after_starttls_a_fleet_client_sees_and_uses_only_the_exports_it_may(tls_server, pki):
    tls = upgrade(greet(tls_server.port), pki["alice"], pki["node"])
    with tls:
        send_option(tls, nbd.OPT_STARTTLS)
        assert read_option_reply(tls)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID)  # already up
        send_option(tls, nbd.OPT_LIST)
        listed = []
        while (reply := read_option_reply(tls))[1] == nbd.REP_SERVER:
            listed.append(reply[2][4:].decode())
        assert listed == ["mine"] and reply[1] == nbd.REP_ACK
        reply_type, message = go_reply(tls, "theirs")
        assert reply_type == nbd.REP_ERR_POLICY and message == b"alice may not use theirs"
        infos = go(tls, "mine")
        _, flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
        assert flags & nbd.TX_READ_ONLY and flags & nbd.TX_CAN_MULTI_CONN
        assert request(tls, nbd.CMD_READ, 0, 5) == (0, b"hello")


def test_a_client_certificate_of_another_ca_or_none_ends_the_connection_and_the_server_goes_on(
    tls_server, pki
):
    for identity in (pki["stranger"], None):
        sock = greet(tls_server.port)
        send_option(sock, nbd.OPT_STARTTLS)
        assert read_option_reply(sock)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ACK)
        context = ssl.create_default_context(cafile=str(pki["node"] / "ca.pem"))
        if identity is not None:
            context.load_cert_chain(str(identity / "cert.pem"), str(identity / "key.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError)):  # noqa: PT012 - TLS 1.3 refuses on first read
            tls = context.wrap_socket(sock, server_hostname=PEER_TLS_NAME)
            tls.settimeout(TIMEOUT)
            go_reply(tls, "mine")
        sock.close()
    tls = upgrade(greet(tls_server.port), pki["alice"], pki["node"])
    with tls:
        assert go_reply(tls, "mine")[0] == nbd.REP_INFO


def test_read_only_and_writable_exports_both_advertise_multi_conn(serve):  # noqa: F811
    server = serve({"ro": MemoryDevice(4096, read_only=True), "rw": MemoryDevice(4096)})
    for name in ("ro", "rw"):
        sock, _, flags = connect(server.port, name)
        sock.close()
        assert flags & nbd.TX_CAN_MULTI_CONN, name


def test_without_tls_configured_starttls_is_unsupported_and_plaintext_goes_on(serve):  # noqa: F811
    server = serve({"disk": MemoryDevice(4096)})
    sock = greet(server.port)
    with sock:
        send_option(sock, nbd.OPT_STARTTLS)
        assert read_option_reply(sock)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_UNSUP)
        assert go_reply(sock, "disk")[0] == nbd.REP_INFO


def test_the_unix_socket_of_a_tls_server_stays_plaintext(serve, pki, tmp_path: Path):  # noqa: F811
    node = pki["node"]
    context = server_context(*(read(node / f) for f in ("key.pem", "cert.pem", "ca.pem")))
    path = str(tmp_path / "nbd.sock")
    serve({"mine": MemoryDevice(4096)}, unix_path=path, tls=NbdTls(lambda: context, only_alice_reads_mine))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)  # mode 0600: the daemon's own user only, who holds the store anyway
        recv_exactly(sock, 18)
        sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
        send_option(sock, nbd.OPT_STARTTLS)
        assert read_option_reply(sock)[:2] == (nbd.OPT_STARTTLS, nbd.REP_ERR_UNSUP)
        assert go_reply(sock, "mine")[0] == nbd.REP_INFO


def test_a_renewed_node_certificate_is_served_from_the_next_handshake(serve, pki, tmp_path: Path):  # noqa: F811
    from cryptography import x509

    from cachepoint.disk.nbd_access import IdentityContext
    from cachepoint.trust.identity import Identity

    identity = Identity.load(pki["node"])
    server = serve({"mine": MemoryDevice(4096)}, tls=NbdTls(IdentityContext(identity), only_alice_reads_mine))

    def served_serial() -> int:
        tls = upgrade(greet(server.port), pki["alice"], pki["node"])
        with tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    renewed = issue_identity(tmp_path / "fleet-ca", tmp_path / "renewed", "node-a", "node")
    identity.replace((renewed / "key.pem").read_bytes(), (renewed / "cert.pem").read_bytes())
    after = served_serial()
    assert before != after == identity.certificate.serial_number


def test_export_access_follows_the_read_layer_rule_and_refuses_revoked_principals(pki, tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cachepoint.disk.nbd_access import ExportAccess

    def der(identity: Path) -> bytes:
        cert = x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)

    ca = tmp_path / "fleet-ca"
    bob = der(issue_identity(ca, tmp_path / "bob", "bob", "user:bob"))
    auditor = der(issue_identity(ca, tmp_path / "carol", "carol", "auditor"))
    other_node = der(issue_identity(ca, tmp_path / "node-b", "node-b", "node"))
    layers = {"desk": ("os/base", "app/office"), "alice/desk": ("os/base", "user/alice/desk")}
    access = ExportAccess("node-a", layers.get)
    alice, node = der(pki["alice"]), der(pki["node"])
    for allowed in (alice, bob, auditor, node, other_node):
        assert access(allowed, "desk") == ""
    for allowed in (alice, auditor, node):
        assert access(allowed, "alice/desk") == ""
    assert "principal 'bob' may not read export 'alice/desk'" in access(bob, "alice/desk")
    assert "principal 'node-b' may not read export 'alice/desk'" in access(other_node, "alice/desk")
    assert access(alice, "gone") == "no export named 'gone'"
    assignments = {"node-b": frozenset({"alice"})}
    assigned = ExportAccess("node-a", layers.get, users_of=lambda n: assignments.get(n, frozenset()))
    assert assigned(other_node, "alice/desk") == "" and assigned(bob, "alice/desk") != ""
    revoking = ExportAccess("node-a", layers.get, revoked=lambda p: 1.0e9 if p.name == "alice" else None)
    assert "'alice': the principal was revoked at 2001-09-09" in revoking(alice, "desk")
    assert revoking(bob, "desk") == ""


def test_a_principal_revoked_while_attached_is_disconnected_when_the_server_rechecks(serve, pki):  # noqa: F811
    node = pki["node"]
    context = server_context(*(read(node / f) for f in ("key.pem", "cert.pem", "ca.pem")))
    revoked: set[str] = set()

    def authorize(certificate: bytes, export: str) -> str:
        name = principal_of_pem(ssl.DER_cert_to_PEM_cert(certificate).encode()).name
        return f"{name} was revoked" if name in revoked else ""

    server = serve({"mine": MemoryDevice(4096)}, tls=NbdTls(lambda: context, authorize))

    async def recheck() -> int:
        return server.server.close_refused()

    tls = upgrade(greet(server.port), pki["alice"], pki["node"])
    with tls:
        go(tls, "mine")
        assert request(tls, nbd.CMD_READ, 0, 16)[0] == 0
        assert server.call(recheck()) == 0  # nothing changed: the connection stays
        assert request(tls, nbd.CMD_READ, 0, 16)[0] == 0
        revoked.add("alice")
        assert server.call(recheck()) == 1
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            request(tls, nbd.CMD_READ, 0, 16)
