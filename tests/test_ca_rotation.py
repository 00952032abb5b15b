"""Rotating the fleet's CA while the fleet runs: `rotate-ca` makes a new CA, both are trusted, a daemon
with a short certificate lifetime renews onto the new CA without a restart and keeps replicating, and
after `rotate-ca --finish` a certificate of the old CA is refused. Real processes, real TLS."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from cachepoint.trust.principal import Principal, Role
from coordinator.pki.ca import CertificateAuthority
from tests.fleet import LAYER, Child, Fleet, cli_json, coordinator_cli, random_image, wait_until
from tests.test_authz_fleet import audit_records
from tests.test_trust_fleet import credentials, data_of, enroll, issued_here, list_nodes, refusal, token

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024


def issuer_fingerprint_of(cert_file: Path, cas: dict[str, CertificateAuthority]) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return next(name for name, ca in cas.items() if cert.issuer == ca.cert.subject)


def publish(fleet: Fleet, coordinator: Child, admin: Path, image: Path, seed: int) -> int:
    """A publish by a freshly enrolled publisher (people and tools enroll again rather than renew, and
    the certificates here live 20 s)."""
    enroll(admin, coordinator, token(fleet, "release-bot", "--role", "publisher"))
    random_image(image, MIB, seed=seed)
    out = cli_json(
        admin, "publish", LAYER, image, "--coordinator", coordinator.address, "--tag", "production"
    )
    return int(out["version"])


def test_a_daemon_renews_onto_a_rotated_ca_without_a_restart_and_the_old_ca_is_refused_after_finish(
    tmp_path: Path,
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('tls = "on"\ncert_lifetime = "20s"\n')
    with Fleet(tmp_path) as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(config)])
        data = data_of(fleet)
        node_store, admin = tmp_path / "n1", tmp_path / "admin"
        enroll(node_store, coordinator, token(fleet, "n1"))
        n1 = fleet.cachepoint("n1", coordinator.address, store=node_store)
        fleet.wait_holds(n1, publish(fleet, coordinator, admin, tmp_path / "v1.img", 31))

        old = CertificateAuthority.load(data)
        # A certificate of the old CA, good for an hour: trusted during the transition, not after.
        old_cert = issued_here(
            fleet, tmp_path / "old-ca-cert", Principal("auditor-old", (Role("auditor"),)), timedelta(hours=1)
        )
        rotated = coordinator_cli("rotate-ca", "--data", str(data), "--json").json()
        assert rotated["retiring"] == old.fingerprint and rotated["new"] != old.fingerprint, rotated  # type: ignore[index]
        new = CertificateAuthority.load(data)
        cas = {"old": old, "new": new}
        assert list_nodes(coordinator.address, credentials(old_cert)) is not None

        # The daemon renews (at 2/3 of 20 s) onto the new CA and keeps the bundle of both.
        identity = node_store / "identity"
        wait_until(
            "the daemon to renew onto the new CA",
            lambda: issuer_fingerprint_of(identity / "cert.pem", cas) == "new",
            60,
            logs=fleet.logs,
        )
        assert (identity / "ca.pem").read_bytes() == new.cert_pem + old.cert_pem
        # A person enrolling during the transition gets a certificate of the new CA (the token still
        # pins the CA the coordinator presents, the old one).
        fleet.wait_holds(n1, publish(fleet, coordinator, admin, tmp_path / "v2.img", 32))
        assert issuer_fingerprint_of(admin / "identity" / "cert.pem", cas) == "new"

        finished = coordinator_cli("rotate-ca", "--finish", "--data", str(data), "--json").json()
        assert finished["retired"] == old.fingerprint, finished  # type: ignore[index]
        assert refusal(coordinator.address, credentials(old_cert)).code() == grpc.StatusCode.UNAVAILABLE
        # The daemon replicates on, past another renewal, all without a restart.
        fleet.wait_holds(n1, publish(fleet, coordinator, admin, tmp_path / "v3.img", 33))
        renewed_serial = x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes()).serial_number
        wait_until(
            "the daemon to renew once more, from the new CA alone",
            lambda: (
                x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes()).serial_number
                != renewed_serial
            ),
            60,
            logs=fleet.logs,
        )
        assert (identity / "ca.pem").read_bytes() == new.cert_pem
        fleet.wait_holds(n1, publish(fleet, coordinator, admin, tmp_path / "v4.img", 34))
        assert n1.running() and n1.status()["coordinator_connected"]
        auditor = tmp_path / "auditor"
        enroll(auditor, coordinator, token(fleet, "auditor-1", "--role", "auditor"))
        rotations = [(r.action, r.subject) for r in audit_records(coordinator, auditor) if r.subject == "ca"]
        assert rotations == [("ca.rotate", "ca"), ("ca.retire", "ca")], rotations
