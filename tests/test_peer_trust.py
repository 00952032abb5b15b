"""Trust at a node's peer port and in the coordinator's fleet listings, end to end: the revocations and
assignments a node learns from its heartbeat replies, the layer rule applied to catalog reads served to
peers, and what FindPeers, ListNodes and GetManifest tell a caller. Real coordinator and daemon
processes, real certificates of the fleet's CA over loopback TLS."""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachepoint.trust.identity import csr_pem, new_key
from cachepoint.trust.principal import PEER_TLS_NAME
from cachepoint.v1 import (
    blocks_pb2,
    blocks_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    version_pb2,
)
from coordinator.fleet.registry import HEARTBEAT_INTERVAL_MS
from tests.fleet import LAYER, Child, Fleet, coordinator_cli, random_image, stored_block_ids, wait_until
from tests.test_authz_fleet import assign, audit_records, enrolled, publish_as
from tests.test_trust_fleet import credentials, data_of, tls_coordinator

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024
HEARTBEAT = HEARTBEAT_INTERVAL_MS / 1000
# A change at the coordinator reaches a peer port with the next heartbeat reply: one interval, plus
# slack for a loaded machine (the test does not time it; it only waits for it).
APPLIED_WITHIN = 10 * HEARTBEAT


def peer_channel(address: str, identity: Path) -> grpc.Channel:
    return grpc.secure_channel(
        address, credentials(identity), options=[("grpc.ssl_target_name_override", PEER_TLS_NAME)]
    )


def rpc_code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def fetched(address: str, identity: Path, ids: list[bytes], version: str) -> list[bytes]:
    with peer_channel(address, identity) as channel:
        stream = blocks_pb2_grpc.BlockExchangeStub(channel).FetchBlocks(
            blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=version), timeout=10
        )
        return [block.id for batch in stream for block in batch.blocks]


def fetch_refusal(address: str, identity: Path, ids: list[bytes], version: str) -> grpc.RpcError | None:
    try:
        fetched(address, identity, ids, version)
    except grpc.RpcError as err:
        return err
    return None


# -- revocations at a peer port --------------------------------------------------------------------


def test_a_revoked_node_is_refused_at_a_peers_port_within_a_heartbeat_interval(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    random_image(image, MIB, seed=21)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        publisher = enrolled(fleet, coordinator, tmp_path, "release-bot", "--role", "publisher")
        holder = enrolled(fleet, coordinator, tmp_path, "n-holder")
        caller = enrolled(fleet, coordinator, tmp_path, "n-caller") / "identity"
        publish_as(publisher, coordinator, LAYER, image, fresh=False)
        peer = fleet.cachepoint("n-holder", coordinator.address, store=holder, subscribe=(f"{LAYER}@1",))
        fleet.wait_holds(peer, 1, ref=f"{LAYER}@1")
        ids = sorted(stored_block_ids(image))[:4]

        assert sorted(fetched(peer.address, caller, ids, f"{LAYER}@1")) == ids
        # An open stream of the caller's at the peer port: it must end too, not only new calls.
        with peer_channel(peer.address, caller) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            revoked_at = time.time()  # before the CLI: the revocation's own record may be in PostgreSQL
            coordinator_cli("revoke", "n-caller", "--data", str(data_of(fleet)))
            wait_until(
                "the peer port to refuse the revoked node",
                lambda: fetch_refusal(peer.address, caller, ids, f"{LAYER}@1") is not None,
                APPLIED_WITHIN,
                logs=fleet.logs,
            )
            took = time.time() - revoked_at  # an upper bound: the CLI's own run is included
            with pytest.raises(grpc.RpcError) as ended:
                for _ in watch:
                    pass
        refused = fetch_refusal(peer.address, caller, ids, f"{LAYER}@1")
        assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED, refused
        assert "'n-caller' was revoked" in str(refused.details()), refused.details()
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED, ended.value
        print(f"peer port refused the revoked node {took:.1f} s after `revoke` (heartbeat {HEARTBEAT} s)")

        # The node keeps the list: restarted while the coordinator is away, it still refuses.
        peer.stop()
        coordinator.stop()
        view = json.loads((holder / "fleet-view.json").read_text())
        assert "n-caller" in view["revoked"], view
        again = fleet.cachepoint("n-holder", coordinator.address, store=holder, subscribe=())
        refused = fetch_refusal(again.address, caller, ids, f"{LAYER}@1")
        assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED, refused


# -- catalog reads at a peer port ------------------------------------------------------------------


def _catalog_answers(address: str, identity: Path, layer: str, digest: bytes) -> dict[str, Any]:
    """What a node's Catalog tells ``identity`` about ``layer`` and manifest ``digest``."""
    with peer_channel(address, identity) as channel:
        catalog = catalog_pb2_grpc.CatalogStub(channel)
        ref = version_pb2.Ref(layer=layer, number=1)
        listed = {s.name for s in catalog.ListLayers(catalog_pb2.ListLayersRequest(), timeout=10).layers}
        out: dict[str, Any] = {"listed": layer in listed}
        out["resolve"] = rpc_code(lambda: catalog.Resolve(catalog_pb2.ResolveRequest(ref=ref), timeout=10))
        out["versions"] = rpc_code(
            lambda: catalog.ListVersions(catalog_pb2.ListVersionsRequest(layer=layer), timeout=10)
        )
        try:
            catalog.GetManifest(catalog_pb2.GetManifestRequest(digest=digest), timeout=10)
            out["manifest"] = "OK"
        except grpc.RpcError as err:
            out["manifest"] = f"{err.code().name}: {err.details()}"
        return out


def test_a_nodes_peer_port_answers_catalog_reads_of_a_users_layer_only_to_whom_may_read_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "alice.img"
    random_image(image, MIB, seed=22)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        alices_node = enrolled(fleet, coordinator, tmp_path, "n-alice")
        assign(fleet, "alice", "n-alice")
        publish_as(alices_node, coordinator, "user/alice/home", image, fresh=False)
        peer = fleet.cachepoint("n-alice", coordinator.address, store=alices_node, subscribe=())
        with grpc.secure_channel(coordinator.address, credentials(alices_node / "identity")) as channel:
            info = catalog_pb2_grpc.CatalogStub(channel).Resolve(
                catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer="user/alice/home", number=1)), timeout=10
            )
        digest, unknown = info.manifest_digest, os.urandom(32)

        def refused_everything(identity: Path) -> None:
            answers = _catalog_answers(peer.address, identity, "user/alice/home", digest)
            assert answers["listed"] is False, answers
            assert answers["resolve"] == answers["versions"] == grpc.StatusCode.PERMISSION_DENIED, answers
            # GetManifest of alice's manifest reads as that of a digest that is not there.
            other = _catalog_answers(peer.address, identity, "user/alice/home", unknown)["manifest"]
            assert answers["manifest"] == other.replace(unknown.hex()[:12], digest.hex()[:12]), answers
            assert answers["manifest"].startswith("NOT_FOUND"), answers

        def allowed_everything(identity: Path) -> None:
            answers = _catalog_answers(peer.address, identity, "user/alice/home", digest)
            assert answers == {
                "listed": True,
                "resolve": grpc.StatusCode.OK,
                "versions": grpc.StatusCode.OK,
                "manifest": "OK",
            }, answers

        alice = enrolled(fleet, coordinator, tmp_path, "alice", "--role", "user:alice") / "identity"
        bob = enrolled(fleet, coordinator, tmp_path, "bob", "--role", "user:bob") / "identity"
        auditor = enrolled(fleet, coordinator, tmp_path, "auditor-1", "--role", "auditor") / "identity"
        other_node = enrolled(fleet, coordinator, tmp_path, "n-other") / "identity"
        allowed_everything(alice)
        allowed_everything(auditor)
        refused_everything(bob)
        refused_everything(other_node)

        # Assigning alice to the other node reaches the peer port with a heartbeat reply.
        assign(fleet, "alice", "n-other")
        wait_until(
            "the peer port to learn that alice is assigned to n-other",
            lambda: _catalog_answers(peer.address, other_node, "user/alice/home", digest)["listed"],
            APPLIED_WITHIN,
            logs=fleet.logs,
        )
        allowed_everything(other_node)


# -- the coordinator's fleet listings and manifests ---------------------------------------------------


def _fleet_stub(coordinator: Child, identity: Path) -> tuple[Any, grpc.Channel]:
    channel = grpc.secure_channel(coordinator.address, credentials(identity))
    return fleet_pb2_grpc.FleetStub(channel), channel


def _holdings(coordinator: Child, identity: Path) -> dict[str, set[str]]:
    fleet, channel = _fleet_stub(coordinator, identity)
    with channel:
        nodes = fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10).nodes
    return {n.node.node_id: {f"{r.layer}@{r.number}" for r in n.complete} | set(n.users) for n in nodes}


def _holders(coordinator: Child, identity: Path, layer: str) -> list[str]:
    fleet, channel = _fleet_stub(coordinator, identity)
    with channel:
        request = fleet_pb2.FindPeersRequest(requester_id="x", version=version_pb2.Ref(layer=layer, number=1))
        return [p.node.node_id for p in fleet.FindPeers(request, timeout=10).peers]


def test_fleet_listings_show_a_caller_only_holdings_it_may_read_and_a_node_speaks_only_for_itself(
    tmp_path: Path,
) -> None:
    alice_image, base_image = tmp_path / "alice.img", tmp_path / "base.img"
    random_image(alice_image, MIB, seed=23)
    random_image(base_image, MIB, seed=24)
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        publisher = enrolled(fleet, coordinator, tmp_path, "release-bot", "--role", "publisher")
        alices_node = enrolled(fleet, coordinator, tmp_path, "n-alice")
        assign(fleet, "alice", "n-alice")
        publish_as(publisher, coordinator, LAYER, base_image, fresh=False)
        publish_as(alices_node, coordinator, "user/alice/home", alice_image, fresh=False)
        fleet.cachepoint("n-alice", coordinator.address, store=alices_node, subscribe=(f"{LAYER}@1",))
        auditor = enrolled(fleet, coordinator, tmp_path, "auditor-1", "--role", "auditor") / "identity"
        bob = enrolled(fleet, coordinator, tmp_path, "bob", "--role", "user:bob") / "identity"
        wait_until(
            "the coordinator to list n-alice holding both versions",
            lambda: (
                _holdings(coordinator, auditor).get("n-alice", set()) >= {f"{LAYER}@1", "user/alice/home@1"}
            ),
            30,
            logs=fleet.logs,
        )
        # The auditor sees every holding and the assignment; bob only what he may read.
        assert _holdings(coordinator, auditor)["n-alice"] == {f"{LAYER}@1", "user/alice/home@1", "alice"}
        assert _holdings(coordinator, bob)["n-alice"] == {f"{LAYER}@1"}
        assert _holders(coordinator, auditor, "user/alice/home") == ["n-alice"]
        assert _holders(coordinator, bob, "user/alice/home") == []
        assert _holders(coordinator, bob, LAYER) == ["n-alice"]

        # GetManifest of alice's manifest: to bob exactly as for a digest that does not exist.
        with grpc.secure_channel(coordinator.address, credentials(auditor)) as channel:
            digest = (
                catalog_pb2_grpc.CatalogStub(channel)
                .Resolve(
                    catalog_pb2.ResolveRequest(ref=version_pb2.Ref(layer="user/alice/home", number=1)),
                    timeout=10,
                )
                .manifest_digest
            )
            catalog_pb2_grpc.CatalogStub(channel).GetManifest(
                catalog_pb2.GetManifestRequest(digest=digest), timeout=10
            )
        unknown = os.urandom(32)
        with grpc.secure_channel(coordinator.address, credentials(bob)) as channel:
            catalog = catalog_pb2_grpc.CatalogStub(channel)
            answers = []
            for wanted in (digest, unknown):
                with pytest.raises(grpc.RpcError) as refused:
                    catalog.GetManifest(catalog_pb2.GetManifestRequest(digest=wanted), timeout=10)
                details = str(refused.value.details()).replace(wanted.hex()[:12], "D")
                answers.append((refused.value.code(), details))
        assert answers[0] == answers[1] and answers[0][0] == grpc.StatusCode.NOT_FOUND, answers

        # Another node cannot register or heartbeat as n-alice: refused, and in the audit log.
        intruder = enrolled(fleet, coordinator, tmp_path, "n-intruder") / "identity"
        stub, channel = _fleet_stub(coordinator, intruder)
        with channel:
            node = fleet_pb2.NodeInfo(node_id="n-alice", site="default", address="127.0.0.1:1")
            for call in (
                lambda: stub.Register(fleet_pb2.RegisterRequest(node=node), timeout=10),
                lambda: stub.Heartbeat(fleet_pb2.HeartbeatRequest(node_id="n-alice"), timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
                assert "not the certificate's 'n-intruder'" in str(refused.value.details())
        denied = [
            r
            for r in audit_records(coordinator, auditor.parent)
            if r.action == "access.denied" and r.actor == "n-intruder"
        ]
        assert {r.subject for r in denied} == {
            "cachepoint.v1.Fleet/Register",
            "cachepoint.v1.Fleet/Heartbeat",
        }, denied
        # n-alice's registration stands: still listed at its own address.
        assert _holdings(coordinator, auditor)["n-alice"] >= {f"{LAYER}@1"}


# -- enrollment, renewal, revocation and assignments in the audit log ----------------------------------


def test_enrollment_renewal_revocation_and_assignments_are_in_the_audit_log_with_who_did_them(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path) as fleet:
        coordinator = tls_coordinator(fleet)
        auditor = enrolled(fleet, coordinator, tmp_path, "auditor-1", "--role", "auditor")
        node = enrolled(fleet, coordinator, tmp_path, "n1", "--site", "branch-7")
        issued = x509.load_pem_x509_certificate((node / "identity" / "cert.pem").read_bytes())
        key = new_key()
        with grpc.secure_channel(coordinator.address, credentials(node / "identity")) as channel:
            renewed = enrollment_pb2_grpc.EnrollmentStub(channel).Renew(
                enrollment_pb2.RenewRequest(csr_pem=csr_pem(key)), timeout=10
            )
        renewed_cert = x509.load_pem_x509_certificate(renewed.certificate_pem)
        assign(fleet, "alice", "n1")
        coordinator_cli("unassign", "alice", "n1", "--data", str(data_of(fleet)))
        coordinator_cli("revoke", "n1", "--data", str(data_of(fleet)))

        me = f"os:{pwd.getpwuid(os.geteuid()).pw_name}"
        wanted = {
            ("enroll.token", "n1"),
            ("enroll.used", "n1"),
            ("cert.renewed", "n1"),
            ("assignment.add", "user/alice"),
            ("assignment.remove", "user/alice"),
            ("principal.revoked", "n1"),
        }

        def trust_records() -> dict[tuple[str, str], Any] | None:
            records = {(r.action, r.subject): r for r in audit_records(coordinator, auditor)}
            return records if wanted <= set(records) else None

        records = wait_until("the audit log to hold the trust records", trust_records, 30, logs=fleet.logs)
        details = {key: json.loads(r.details_json) for key, r in records.items()}
        # What an admin did at the data directory names the OS user who ran the command ...
        for action in ("enroll.token", "assignment.add", "assignment.remove", "principal.revoked"):
            subject = "user/alice" if action.startswith("assignment") else "n1"
            assert records[(action, subject)].actor == me, records[(action, subject)]
        assert details[("enroll.token", "n1")]["role"] == "node"
        assert details[("assignment.add", "user/alice")]["node"] == "n1"
        # ... what the coordinator did names the certificate's principal, with the serial issued.
        used = details[("enroll.used", "n1")]
        assert records[("enroll.used", "n1")].actor == "n1"
        serial = f"{issued.serial_number:x}"
        assert (used["role"], used["site"], used["serial"]) == ("node", "branch-7", serial)
        assert details[("cert.renewed", "n1")]["serial"] == f"{renewed_cert.serial_number:x}"
        assert details[("cert.renewed", "n1")]["previous_serial"] == f"{issued.serial_number:x}"
        assert list((data_of(fleet) / "audit-queue").glob("*.json")) == []
        # The chain still verifies, through the running coordinator.
        verdict = coordinator_cli(
            "--identity",
            str(auditor / "identity"),
            "history",
            "audit",
            "verify",
            "--coordinator",
            coordinator.address,
            "--json",
        ).json()
        assert verdict["ok"] is True, verdict  # type: ignore[index]
