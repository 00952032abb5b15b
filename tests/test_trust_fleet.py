"""Fleet trust end to end: a coordinator serving mutual TLS with its own CA, machines enrolled with
one-time tokens, daemons replicating over TLS and renewing their certificates, and everything else
refused. Real processes, real TLS handshakes on loopback."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import stat
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cachepoint.trust.identity import key_pem, new_key
from cachepoint.trust.principal import Principal, Role, principal_of
from cachepoint.trust.token import JoinToken
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from coordinator.backends.trust_tables import FOLLOW_S
from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS
from coordinator.pki.ca import CertificateAuthority
from tests.conftest import sha256_file
from tests.fleet import (
    LAYER,
    PRODUCTION,
    Child,
    Fleet,
    cachepoint_cli,
    cli_json,
    coordinator_cli,
    random_image,
    shared_catalog,
    wait_until,
)

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------------


def tls_coordinator(fleet: Fleet, *extra: str) -> Child:
    coordinator = fleet.coordinator(extra=["--tls", *extra])
    assert coordinator.ready.get("enroll") and coordinator.ready.get("ca_fingerprint"), coordinator.ready
    return coordinator


def data_of(fleet: Fleet) -> Path:
    return fleet.root / "coordinator"


def token(fleet: Fleet, name: str, *args: str) -> str:
    out = coordinator_cli("enroll", name, "--data", str(data_of(fleet)), *args, "--json").json()
    assert isinstance(out, dict) and out["token"].startswith("cpjoin1."), out
    return str(out["token"])


def token_records(fleet: Fleet) -> list[str]:
    """Every join token the coordinator keeps, as stored: files in DATA/ca/tokens, or rows of the
    shared catalog's join_tokens table."""
    shared = shared_catalog()
    if shared is None:
        return [p.read_text() for p in (data_of(fleet) / "ca" / "tokens").rglob("*.json")]
    with psycopg.connect(shared.dsn, autocommit=True) as conn:
        return [repr(row) for row in conn.execute("SELECT * FROM join_tokens")]


def enroll(store: Path, coordinator: Child, secret: str, *args: str | Path) -> dict[str, Any]:
    return cli_json(store, "enroll", "--coordinator", coordinator.address, "--token", secret, *args)


def credentials(directory: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (directory / "ca.pem").read_bytes(),
        (directory / "key.pem").read_bytes(),
        (directory / "cert.pem").read_bytes(),
    )


def write_identity(directory: Path, key: bytes, cert: x509.Certificate, ca: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "key.pem").write_bytes(key)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.pem").write_bytes(ca)
    return directory


def issued_here(
    fleet: Fleet,
    directory: Path,
    principal: Principal,
    lifetime: timedelta,
    ca: CertificateAuthority | None = None,
) -> Path:
    """An identity issued directly by a CA (the fleet's unless ``ca``), for lifetimes no token gives."""
    fleet_ca = CertificateAuthority.load(data_of(fleet))
    issuer = ca or fleet_ca
    key = new_key()
    cert = issuer.issue(key.public_key(), principal, lifetime)
    return write_identity(directory, key_pem(key), cert, fleet_ca.cert_pem)


def expired_here(fleet: Fleet, directory: Path, principal: Principal) -> Path:
    """An identity whose certificate has expired: issued for a second and waited out, so that no
    caller's fast start can use it while it is still valid."""
    identity = issued_here(fleet, directory, principal, timedelta(seconds=1))
    cert = x509.load_pem_x509_certificate((identity / "cert.pem").read_bytes())
    left = cert.not_valid_after_utc.timestamp() - time.time()
    time.sleep(max(0.0, left) + 1.1)  # the validity check is to the second: wait past the next one
    return identity


def list_nodes(address: str, creds: grpc.ChannelCredentials | None) -> fleet_pb2.ListNodesResponse:
    channel = grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    with channel:
        return fleet_pb2_grpc.FleetStub(channel).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)


def refusal(address: str, creds: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        list_nodes(address, creds)
    return refused.value


def fleet_holds(coordinator: str, identity: Path, node_id: str, version: str) -> bool:
    out = coordinator_cli("--identity", str(identity), "fleet", "--coordinator", coordinator, "--json").json()
    nodes = {n["node_id"]: n for n in out["nodes"]}  # type: ignore[index]
    node = nodes.get(node_id)
    return bool(node and node["healthy"] and version in node["versions"])


def served_certificate(address: str) -> x509.Certificate:
    """The certificate a TLS port presents (read without verifying: only to look at it)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# -- enrollment and replication -----------------------------------------------------------------------


def test_an_enrolled_node_follows_a_publish_by_an_enrolled_publisher_over_mutual_tls(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 3 * MIB, seed=7)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        admin, node_store, peer_store = tmp_path / "admin", tmp_path / "n1", tmp_path / "n2"
        publisher = enroll(admin, coordinator, token(fleet, "release-bot", "--role", "publisher"))
        assert publisher["name"] == "release-bot" and publisher["roles"] == ["publisher"], publisher
        n1_token = token(fleet, "n1", "--site", "branch-12")
        enrolled = enroll(node_store, coordinator, n1_token)
        assert enrolled["roles"] == ["node"] and enrolled["site"] == "branch-12", enrolled
        enroll(peer_store, coordinator, token(fleet, "n2", "--site", "branch-12"))

        # The key was made where it is kept, readable by its owner only; the certificate names the node.
        key_file = node_store / "identity" / "key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate((node_store / "identity" / "cert.pem").read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(uris.get_values_for_type(x509.UniformResourceIdentifier)) == {
            "cachepoint:role:node",
            "cachepoint:site:branch-12",
        }
        assert principal_of(cert).name == "n1"
        # The coordinator keeps a hash of each token's secret, never the secret itself.
        secret = JoinToken.parse(n1_token).secret
        records = token_records(fleet)
        assert len(records) == 3 and not any(secret in text for text in records)

        n1 = fleet.cachepoint("n1", coordinator.address, site="branch-12", store=node_store)
        published = cli_json(
            admin, "publish", LAYER, image, "--coordinator", coordinator.address, "--tag", "production"
        )
        fleet.wait_holds(n1, published["version"])
        assert sha256_file(_export(node_store, tmp_path / "n1.img")) == sha256_file(image)

        # A second node of the site fetches from the first over the peers' mutual TLS.
        wait_until(
            "the coordinator to list n1 holding the version",
            lambda: fleet_holds(coordinator.address, admin / "identity", "n1", f"{LAYER}@1"),
            30,
            logs=fleet.logs,
        )
        n2 = fleet.cachepoint("n2", coordinator.address, site="branch-12", store=peer_store)
        status = fleet.wait_holds(n2, 1)
        assert status["bytes_by_source"].get("site", {}).get("blocks", 0) > 0, status["bytes_by_source"]
        assert sha256_file(_export(peer_store, tmp_path / "n2.img")) == sha256_file(image)

        # A person's one-off pull presents their identity to the coordinator and to the peers.
        laptop = tmp_path / "laptop"
        enroll(
            laptop, coordinator, token(fleet, "alice", "--role", "user:alice"), "--identity", laptop / "id"
        )
        pulled = cli_json(
            laptop, "--identity", laptop / "id", "pull", PRODUCTION, "--from", coordinator.address
        )
        assert pulled["ref"] == f"{LAYER}@1", pulled
        assert sum(s["blocks"] for s in pulled["sources"] if s["class"] != "origin") > 0, pulled
        assert sha256_file(_export(laptop, tmp_path / "laptop.img")) == sha256_file(image)


def _export(store: Path, dest: Path) -> Path:
    cli_json(store, "export", PRODUCTION, dest)
    return dest


def test_a_join_token_works_once_and_not_after_it_expires(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        once = token(fleet, "n1")
        enroll(tmp_path / "n1", coordinator, once)
        again = cachepoint_cli(
            tmp_path / "n1b", "enroll", "--coordinator", coordinator.address, "--token", once, check=False
        )
        assert again.code == 10, again.err
        assert "PERMISSION_DENIED" in again.err and "already used" in again.err, again.err
        assert not (tmp_path / "n1b" / "identity").exists()

        short = token(fleet, "n3", "--ttl", "1s")
        time.sleep(2)
        late = cachepoint_cli(
            tmp_path / "n3", "enroll", "--coordinator", coordinator.address, "--token", short, check=False
        )
        assert late.code == 10, late.err
        assert "PERMISSION_DENIED" in late.err and "expired" in late.err, late.err

        forged = token(fleet, "n4")[:-6] + "AAAAAA"  # the secret no longer hashes to a record
        wrong = cachepoint_cli(
            tmp_path / "n4", "enroll", "--coordinator", coordinator.address, "--token", forged, check=False
        )
        assert wrong.code in (4, 10), wrong.err


def test_enrollment_refuses_a_coordinator_that_does_not_present_the_tokens_ca(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        ours = tls_coordinator(fleet)
        theirs = fleet.coordinator(data=tmp_path / "theirs", name="theirs", extra=["--tls"])
        secret = token(fleet, "n1")
        # The same secret and CA fingerprint, pointed at the other coordinator's enrollment port.
        misdirected = dataclasses.replace(
            JoinToken.parse(secret), enroll_port=int(theirs.ready["enroll"].rpartition(":")[2])
        ).encode()
        wrong = cachepoint_cli(
            tmp_path / "n1", "enroll", "--coordinator", theirs.address, "--token", misdirected, check=False
        )
        assert wrong.code == 10 and "does not present the fleet's CA" in wrong.err, wrong.err
        enroll(tmp_path / "n1", ours, secret)  # the token was not spent on the wrong coordinator


# -- refusals -----------------------------------------------------------------------------------------


def test_calls_without_a_current_certificate_of_the_fleet_are_refused(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        address = coordinator.address
        ca_pem = CertificateAuthority.load(data_of(fleet)).cert_pem
        good = issued_here(
            fleet, tmp_path / "good", Principal("auditor-1", (Role("auditor"),)), timedelta(hours=1)
        )
        assert list_nodes(address, credentials(good)) is not None

        # Refused at the TLS handshake, which a gRPC client sees as UNAVAILABLE (coordinator/pki/guard.py).
        assert refusal(address, None).code() == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert refusal(address, grpc.ssl_channel_credentials(ca_pem)).code() == grpc.StatusCode.UNAVAILABLE
        other = CertificateAuthority.create(tmp_path / "other")
        stranger = issued_here(
            fleet, tmp_path / "stranger", Principal("n1", (Role("node"),)), timedelta(hours=1), ca=other
        )
        assert refusal(address, credentials(stranger)).code() == grpc.StatusCode.UNAVAILABLE
        short = issued_here(fleet, tmp_path / "short", Principal("n9", (Role("node"),)), timedelta(seconds=3))

        # A certificate that expires while its connection is open is refused by the coordinator itself.
        with grpc.secure_channel(address, credentials(short)) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
            time.sleep(4)
            with pytest.raises(grpc.RpcError) as expired:
                stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED, expired.value
        assert "expired" in str(expired.value.details())
        assert (
            refusal(address, credentials(short)).code() == grpc.StatusCode.UNAVAILABLE
        )  # and at a new handshake

        # The CLI says what a failed handshake most likely means, with its exit code for "unreachable".
        run = coordinator_cli("--identity", str(stranger), "fleet", "--coordinator", address, check=False)
        assert run.code == 9 and "TLS handshake failed" in run.err, run.err


def test_a_revoked_principal_is_refused_at_once_and_can_be_enrolled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        enroll(
            tmp_path / "carol",
            coordinator,
            token(fleet, "carol", "--role", "user:carol"),
            "--identity",
            tmp_path / "carol-id",
        )
        creds = credentials(tmp_path / "carol-id")
        with grpc.secure_channel(coordinator.address, creds) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
            # `history` commands present the identity named by the environment too (carol has no
            # layers yet: NOT_FOUND, which only a call past TLS and the guard can get).
            monkeypatch.setenv("CACHEPOINT_IDENTITY", str(tmp_path / "carol-id"))
            history = coordinator_cli(
                "history", "timeline", "carol", "--coordinator", coordinator.address, check=False
            )
            monkeypatch.delenv("CACHEPOINT_IDENTITY")
            assert history.code == 3 and "has no layers" in history.err, history.err
            revoked = coordinator_cli("revoke", "carol", "--data", str(data_of(fleet)), "--json").json()
            assert revoked["revoked"] == "carol", revoked  # type: ignore[index]
            if shared_catalog() is not None:
                # A replica reads the revocations again when the change's notification arrives (at the
                # latest after FOLLOW_S, trust_tables.py): "at once" is a moment later there; the
                # embedded coordinator reads its file on every call.
                wait_until("the replica to read the revocation", lambda: _refused(stub), 4 * FOLLOW_S)
            with pytest.raises(grpc.RpcError) as refused:  # the same open connection
                stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "carol" in str(refused.value.details()) and "revoked" in str(refused.value.details())
        assert refusal(coordinator.address, creds).code() == grpc.StatusCode.PERMISSION_DENIED

        enroll(
            tmp_path / "carol",
            coordinator,
            token(fleet, "carol", "--role", "user:carol"),
            "--identity",
            tmp_path / "carol-new",
        )
        assert list_nodes(coordinator.address, credentials(tmp_path / "carol-new")) is not None
        assert refusal(coordinator.address, creds).code() == grpc.StatusCode.PERMISSION_DENIED


def _refused(stub: fleet_pb2_grpc.FleetStub) -> bool | None:
    try:
        stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.PERMISSION_DENIED or None
    return None


def test_revoking_a_node_ends_its_open_watch_stream(tmp_path: Path) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        enroll(tmp_path / "n1", coordinator, token(fleet, "n1"))
        with grpc.secure_channel(coordinator.address, credentials(tmp_path / "n1" / "identity")) as channel:
            stream = catalog_pb2_grpc.CatalogStub(channel).Watch(
                catalog_pb2.WatchRequest(layers=[LAYER]), timeout=60
            )
            # The stream is open (no event yet); nothing else is sent on it until the coordinator ends it.
            coordinator_cli("revoke", "n1", "--data", str(data_of(fleet)))
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED, ended.value
        assert "revoked" in str(ended.value.details())


def test_importing_a_ca_whose_key_does_not_match_is_refused_naming_both_files(tmp_path: Path) -> None:
    first = CertificateAuthority.create(tmp_path / "one")
    CertificateAuthority.create(tmp_path / "two")
    cert_file, key_file = first.directory / "ca.crt", tmp_path / "two" / "ca" / "ca.key"
    run = coordinator_cli(
        "serve",
        "--data",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--ca-cert",
        str(cert_file),
        "--ca-key",
        str(key_file),
        check=False,
    )
    assert run.code == 4, run.err
    assert str(cert_file) in run.err and str(key_file) in run.err, run.err
    assert not (tmp_path / "data" / "ca").exists()


def test_a_coordinator_serves_an_imported_ca(tmp_path: Path) -> None:
    operator = CertificateAuthority.create(tmp_path / "operator")
    with Fleet(tmp_path) as fleet:
        coordinator = fleet.coordinator(
            extra=[
                "--ca-cert",
                str(operator.directory / "ca.crt"),
                "--ca-key",
                str(operator.directory / "ca.key"),
            ]
        )
        assert coordinator.ready["ca_fingerprint"] == operator.fingerprint
        enroll(tmp_path / "n1", coordinator, token(fleet, "n1"))
        issuer = served_certificate(coordinator.address).issuer
        assert issuer == operator.cert.subject


# -- renewal ------------------------------------------------------------------------------------------


def test_a_daemon_keeps_serving_across_the_renewal_of_its_certificate(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 1 * MIB, seed=3)
    config = tmp_path / "coordinator.toml"
    config.write_text('tls = "on"\ncert_lifetime = "20s"\n')
    with Fleet(tmp_path) as fleet:
        coordinator = fleet.coordinator(extra=["--config", str(config)])
        node_store, admin = tmp_path / "n1", tmp_path / "admin"
        enroll(node_store, coordinator, token(fleet, "n1"))
        cert_file = node_store / "identity" / "cert.pem"
        first = x509.load_pem_x509_certificate(cert_file.read_bytes())
        n1 = fleet.cachepoint("n1", coordinator.address)
        assert served_certificate(n1.address).serial_number == first.serial_number

        wait_until(
            "the daemon to renew its certificate",
            lambda: serial(cert_file) != first.serial_number,
            60,
            logs=fleet.logs,
        )
        renewed = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert principal_of(renewed).name == "n1" and renewed.not_valid_after_utc > first.not_valid_after_utc
        assert stat.S_IMODE((node_store / "identity" / "key.pem").stat().st_mode) == 0o600
        # Past the first certificate's end: everything the daemon does now rides on the renewed one.
        wait_until(
            "the first certificate to expire",
            lambda: time.time() > first.not_valid_after_utc.timestamp() + 1,
            30,
        )
        assert served_certificate(n1.address).serial_number != first.serial_number  # no restart
        enroll(admin, coordinator, token(fleet, "release-bot", "--role", "publisher"))
        published = cli_json(
            admin, "publish", LAYER, image, "--coordinator", coordinator.address, "--tag", "production"
        )
        fleet.wait_holds(n1, published["version"])
        assert n1.running()
        assert sha256_file(_export(node_store, tmp_path / "n1.img")) == sha256_file(image)
        # Its heartbeats too: the long-lived channel they use was made again with the renewed certificate.
        time.sleep(2 * HEARTBEAT_INTERVAL_MS / 1000)
        assert n1.status()["coordinator_connected"], fleet.logs()
        # Asked with the node's own identity, which the daemon keeps renewing: the admin's lives 20 s,
        # and a loaded machine can take that long between its enrollment and here.
        assert fleet_holds(coordinator.address, node_store / "identity", "n1", f"{LAYER}@1")


def test_plaintext_stays_the_default_without_a_ca(tmp_path: Path) -> None:
    with Fleet(tmp_path, tls_on=False) as fleet:  # the harness's own fleets have a CA unless told
        coordinator = fleet.coordinator()
        assert "enroll" not in coordinator.ready
        assert not (data_of(fleet) / "ca").exists()
        assert list_nodes(coordinator.address, None) is not None
        run = coordinator_cli("enroll", "n1", "--data", str(data_of(fleet)), check=False)
        assert run.code == 3 and "no CA" in run.err, run.err
