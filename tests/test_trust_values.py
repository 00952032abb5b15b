"""Fleet trust without processes: how certificates name principals, join tokens, token records,
revocations and an identity's renewal on disk."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cachepoint.errors import InvalidInput
from cachepoint.trust.identity import CERT_FILE, KEY_FILE, Identity, key_pem, new_key
from cachepoint.trust.principal import NotAPrincipal, Principal, Role, principal_of
from cachepoint.trust.token import JoinToken
from coordinator.pki import revocation, tokens
from coordinator.pki.ca import CertificateAuthority, server_hosts
from coordinator.pki.revocation import Revocations


def _pem(cert: object) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def test_a_certificate_names_its_principal_and_roles_and_site(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    for principal in (
        Principal("n1", (Role("node"),), "branch-12"),
        Principal("alice", (Role.parse("user:alice"),)),
        Principal("release-bot", (Role("publisher"), Role("auditor"))),
    ):
        cert = ca.issue(new_key().public_key(), principal, timedelta(hours=1))
        read = principal_of(cert)
        assert (read.name, read.roles, read.site) == (principal.name, principal.roles, principal.site)
        assert read.issued is not None and abs(read.issued.timestamp() - time.time()) < 5


def test_the_coordinators_own_certificate_names_no_principal(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    cert = ca.issue_server(new_key().public_key(), ["127.0.0.1", "coord.example"], timedelta(hours=1))
    with pytest.raises(NotAPrincipal):
        principal_of(cert)


@pytest.mark.parametrize("text", ["root", "user", "node:x", "user:", "user:bad name"])
def test_a_role_outside_the_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Role.parse(text)


def test_a_join_token_reads_back_and_a_damaged_one_is_refused() -> None:
    token = JoinToken.new("ab" * 32, 7401)
    assert JoinToken.parse(token.encode()) == token
    for damaged in ("", "hello", token.encode()[:20], "cpjoin1.!!!"):
        with pytest.raises(InvalidInput):
            JoinToken.parse(damaged)


def test_of_two_enrollments_racing_with_one_token_exactly_one_wins(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    now = time.time()
    tokens.record(tmp_path, "h" * 64, tokens.TokenRecord("n1", "node", "", now + 60, now))
    results: list[str] = []

    def spend() -> None:
        try:
            results.append(tokens.spend(tmp_path, "h" * 64).name)
        except tokens.TokenRefused as err:
            results.append(str(err))

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("n1") == 1, results
    assert all("already used" in r for r in results if r != "n1"), results


def test_a_revocation_refuses_certificates_issued_up_to_it_and_not_after(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    revocations = Revocations(tmp_path)

    def issued(name: str) -> Principal:
        return principal_of(
            ca.issue(new_key().public_key(), Principal(name, (Role("node"),)), timedelta(hours=1))
        )

    old, other = issued("n1"), issued("n2")
    assert revocations.refuses(old) is None
    at = revocation.revoke(tmp_path, "n1")
    assert revocations.refuses(old) == at and revocations.refuses(other) is None
    time.sleep(max(0.0, int(at) + 1 - time.time()))  # certificates carry whole seconds
    assert revocations.refuses(issued("n1")) is None


def test_an_identity_whose_renewal_stopped_between_its_renames_loads_the_new_pair(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "data")
    principal = Principal("n1", (Role("node"),))
    first_key = new_key()
    first = ca.issue(first_key.public_key(), principal, timedelta(hours=1))
    identity = Identity.save(tmp_path / "id", key_pem(first_key), _pem(first), ca.cert_pem)
    second_key = new_key()
    second = ca.issue(second_key.public_key(), principal, timedelta(hours=2))
    # As replace() leaves it when stopped after renaming the key, before renaming the certificate:
    (identity.directory / KEY_FILE).write_bytes(key_pem(second_key))
    (identity.directory / (CERT_FILE + ".new")).write_bytes(_pem(second))
    loaded = Identity.load(identity.directory)
    assert loaded.certificate.serial_number == second.serial_number
    assert not (identity.directory / (CERT_FILE + ".new")).exists()


def test_the_coordinators_certificate_names_its_hosts_and_tls_names(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    hosts = server_hosts("10.1.2.3", ["coord.example", "192.0.2.7"])
    cert = ca.issue_server(new_key().public_key(), hosts, timedelta(hours=1))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coord.example", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert {"10.1.2.3", "192.0.2.7", "127.0.0.1", "::1"} <= ips
