"""The refusal matrix: every RPC of every service on the coordinator's port and on a node's peer port,
called with no client certificate, a certificate of another CA, an expired one, a revoked one, and a
valid one of a role the method's rule does not allow, is refused; refusals of calls that would change
state are in the audit log. The methods come from the services' descriptors, so a new RPC cannot
escape the matrix (it fails here until it has a rule). Real processes, real TLS handshakes.

How each refusal surfaces (README "Who may do what", the proto files' status notes):
- no certificate, another CA's, an expired one: refused in the TLS handshake, which a gRPC client sees
  as UNAVAILABLE (gRPC's Python server cannot ask for a client certificate without requiring it);
- a revoked principal: PERMISSION_DENIED (at a peer port once the node's next heartbeat brought it);
- the wrong role: PERMISSION_DENIED naming the rule. Methods open to every principal of the fleet
  (their answers are filtered instead) have no wrong role; OPEN lists them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cachepoint.trust import peer_authz
from cachepoint.trust.principal import PEER_TLS_NAME, Principal, Role
from cachepoint.v1 import blocks_pb2, catalog_pb2, enrollment_pb2, fleet_pb2, history_pb2
from coordinator import authz
from coordinator.pki.ca import CertificateAuthority
from tests.conftest import coordinator_catalog
from tests.fleet import Child, Fleet, coordinator_cli, wait_until
from tests.test_authz_fleet import audit_records, enrolled
from tests.test_trust_fleet import credentials, data_of, expired_here, issued_here, tls_coordinator

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

COORDINATOR_SERVICES = (
    blocks_pb2,
    catalog_pb2,
    enrollment_pb2,
    fleet_pb2,
    history_pb2,
    health_pb2,
    reflection_pb2,
)
PEER_SERVICES = (blocks_pb2, catalog_pb2, health_pb2, reflection_pb2)
HANDSHAKE = grpc.StatusCode.UNAVAILABLE
DENIED = grpc.StatusCode.PERMISSION_DENIED
CALL_TIMEOUT = 15.0


def methods(modules: tuple[Any, ...]) -> list[MethodDescriptor]:
    return [
        method
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


OPEN = {
    "coordinator": {m for m, rule in authz.RULES.items() if rule.check is authz._anyone},
    "peer": {m for m, rule in peer_authz.PEER_RULES.items() if rule.check is peer_authz._anyone},
}


def filled(descriptor: Descriptor) -> Message:
    """A request that names what a wrong-role caller may not touch: bob's layer, bob's history,
    another node's id."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.message_type is not None and not field.is_repeated:
            getattr(message, field.name).CopyFrom(filled(field.message_type))
        elif field.name == "layer":
            setattr(message, field.name, "user/bob/home")
        elif field.name == "number":
            setattr(message, field.name, 1)
        elif field.name == "user":
            setattr(message, field.name, "bob")
        elif field.name == "node_id":
            setattr(message, field.name, "n-elsewhere")
        elif field.name == "address":
            setattr(message, field.name, "127.0.0.1:1")
        elif field.name == "site":
            setattr(message, field.name, "default")
    return message


def call(channel: grpc.Channel, method: MethodDescriptor) -> grpc.StatusCode:
    """The method called once with a filled request; the status it ends with."""
    output = message_factory.GetMessageClass(method.output_type)
    args = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": output.FromString}
    request = filled(method.input_type)
    path = path_of(method)
    try:
        if method.client_streaming:
            kind = channel.stream_stream if method.server_streaming else channel.stream_unary
            result = kind(path, **args)(iter([request]), timeout=CALL_TIMEOUT)
        else:
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            result = kind(path, **args)(request, timeout=CALL_TIMEOUT)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@dataclass
class Matrix:
    fleet: Fleet
    coordinator: Child
    peer: Child
    identities: dict[str, Path | None]  # case -> identity directory (None: no certificate)
    auditor: Path

    def channel(self, port: str, case: str) -> grpc.Channel:
        address = self.coordinator.address if port == "coordinator" else self.peer.address
        options = [("grpc.ssl_target_name_override", PEER_TLS_NAME)] if port == "peer" else []
        if case == "plaintext":
            return grpc.insecure_channel(address)
        identity = self.identities[case]
        if identity is None:  # TLS, verifying the server, but presenting no certificate
            ca = (self.auditor / "identity" / "ca.pem").read_bytes()
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=options)
        return grpc.secure_channel(address, credentials(identity), options=options)

    def denied_in_audit(self, actor: str, method: str) -> list[Any]:
        return [
            r
            for r in audit_records(self.coordinator, self.auditor)
            if r.action == "access.denied" and r.actor == actor and r.subject == method.lstrip("/")
        ]


@pytest.fixture(scope="module")
def matrix(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, coordinator_backend: str
) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("matrix")
    with coordinator_catalog(request, coordinator_backend, root), Fleet(root) as fleet:
        coordinator = tls_coordinator(fleet)
        auditor = enrolled(fleet, coordinator, root, "auditor-1", "--role", "auditor")
        peer_store = enrolled(fleet, coordinator, root, "n-peer")
        mallory = enrolled(fleet, coordinator, root, "mallory", "--role", "user:mallory") / "identity"
        revoked = enrolled(fleet, coordinator, root, "n-revoked") / "identity"
        other_ca = CertificateAuthority.create(root / "other-ca")
        foreign = issued_here(
            fleet, root / "foreign", Principal("n-foreign", (Role("node"),)), timedelta(hours=1), ca=other_ca
        )
        expired = expired_here(fleet, root / "expired", Principal("n-expired", (Role("node"),)))
        peer = fleet.cachepoint("n-peer", coordinator.address, store=peer_store, subscribe=())
        coordinator_cli("revoke", "n-revoked", "--data", str(data_of(fleet)))
        health = next(m for m in methods((health_pb2,)) if m.name == "Check")
        found = Matrix(
            fleet,
            coordinator,
            peer,
            {
                "no certificate": None,
                "plaintext": None,
                "foreign CA": foreign,
                "expired": expired,
                "revoked": revoked,
                "wrong role": mallory,
            },
            auditor,
        )
        wait_until(
            "the peer port to learn of the revocation",
            lambda: call(found.channel("peer", "revoked"), health) == DENIED,
            30,
            logs=fleet.logs,
        )
        time.sleep(1.5)  # the expired certificate lived one second
        yield found


def cases(port: str) -> list[Any]:
    modules = COORDINATOR_SERVICES if port == "coordinator" else PEER_SERVICES
    return [pytest.param(port, path_of(m), id=f"{port}-{path_of(m).lstrip('/')}") for m in methods(modules)]


def descriptor_of(path: str) -> MethodDescriptor:
    return next(m for m in methods(COORDINATOR_SERVICES) if path_of(m) == path)


@pytest.mark.parametrize(("port", "path"), cases("coordinator") + cases("peer"))
def test_every_rpc_is_refused_without_a_current_certificate_of_the_fleet_or_with_the_wrong_role(
    matrix: Matrix, port: str, path: str
) -> None:
    method = descriptor_of(path)
    rules = authz.RULES if port == "coordinator" else peer_authz.PEER_RULES
    assert path in rules, f"{path} has no rule at the {port}'s port"
    for case in ("plaintext", "no certificate", "foreign CA", "expired"):
        with matrix.channel(port, case) as channel:
            assert call(channel, method) == HANDSHAKE, (case, path)
    with matrix.channel(port, "revoked") as channel:
        assert call(channel, method) == DENIED, ("revoked", path)
    if path not in OPEN[port]:
        with matrix.channel(port, "wrong role") as channel:
            assert call(channel, method) == DENIED, ("wrong role", path)
    changes_state = port == "coordinator" and authz.RULES[path].changes_state
    if changes_state:  # both refusals are in the audit log, under the certificates' names
        assert matrix.denied_in_audit("n-revoked", path), path
        if path not in OPEN[port]:
            records = matrix.denied_in_audit("mallory", path)
            assert records and json.loads(records[-1].details_json)["rule"] == authz.RULES[path].name, path


def test_the_methods_open_to_every_principal_are_those_whose_answers_are_filtered() -> None:
    assert OPEN["coordinator"] == {
        "/cachepoint.v1.Catalog/ListLayers",
        "/cachepoint.v1.Catalog/GetManifest",
        "/cachepoint.v1.Catalog/Watch",
        "/cachepoint.v1.BlockExchange/HasBlocks",
        "/cachepoint.v1.BlockExchange/FetchBlocks",
        "/cachepoint.v1.Fleet/FindPeers",
        "/cachepoint.v1.Fleet/ListNodes",
        "/cachepoint.v1.Enrollment/Enroll",
        "/cachepoint.v1.Enrollment/Renew",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",  # the schema: public
    }
    assert OPEN["peer"] == {
        "/cachepoint.v1.Catalog/ListLayers",
        "/cachepoint.v1.Catalog/GetManifest",
        "/cachepoint.v1.BlockExchange/HasBlocks",
        "/cachepoint.v1.BlockExchange/FetchBlocks",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",  # the schema: public
    }
