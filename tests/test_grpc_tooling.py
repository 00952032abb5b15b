"""gRPC tools see what both servers serve: a reflection client (as grpcurl's `list`) finds every service
of the coordinator's port and of a node's peer port, and the health service answers SERVING for each
of them by its full name. Real processes; with the harness's mutual TLS a caller of any role of the
fleet may ask (README "Who may do what")."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.fleet import Fleet

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
PEER_SERVICES = {"cachepoint.v1.BlockExchange", "cachepoint.v1.Catalog", HEALTH, REFLECTION}
COORDINATOR_SERVICES = PEER_SERVICES | {"cachepoint.v1.Fleet", "cachepoint.v1.History"}


def listed_and_health(channel: grpc.Channel) -> tuple[set[str], dict[str, str]]:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    health = health_pb2_grpc.HealthStub(channel)
    states = {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=15).status
        )
        for name in services
    }
    return services, states


def test_reflection_lists_every_service_of_both_servers_and_health_serves_each_by_name(
    tmp_path: Path,
) -> None:
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        node = fleet.cachepoint("n1", coordinator.address, subscribe=())
        expected = {
            coordinator.address: COORDINATOR_SERVICES
            | ({"cachepoint.v1.Enrollment"} if fleet.tls_on else set()),
            node.address: PEER_SERVICES,
        }
        for address, services in expected.items():
            # A user of the fleet: no role that the services' own rules favour.
            with fleet.channel(address, "user:carol", name="carol") as channel:
                listed, states = listed_and_health(channel)
            assert listed == services, address
            assert states == dict.fromkeys(services, "SERVING"), address
