"""The harness's fleets serve mutual TLS unless CACHEPOINT_TEST_TLS=0 (tests/tls.py): a plaintext
client is refused, and a node enrolled for real (`Fleet.enroll`: a join token, `cachepoint enroll`)
joins a fleet whose other members the harness issued certificates to."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc
from tests import tls
from tests.fleet import Fleet, publish, random_image

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024


@pytest.mark.skipif(not tls.ENABLED, reason="CACHEPOINT_TEST_TLS=0: the suite runs its fleets in plaintext")
def test_the_harness_fleet_refuses_plaintext_and_a_node_enrolled_for_real_follows_a_publish(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MIB, seed=23)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        assert coordinator.ready.get("enroll"), coordinator.ready  # it has a CA: TLS
        with grpc.insecure_channel(coordinator.address) as ch, pytest.raises(grpc.RpcError) as refused:
            fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value

        store = tmp_path / "lab-1"
        enrolled = fleet.enroll(store, "lab-1", "--site", "lab")
        assert (enrolled["roles"], enrolled["site"]) == (["node"], "lab"), enrolled
        node = fleet.cachepoint("lab-1", coordinator.address, site="lab", store=store)
        assert node.trust is None, "the harness left the enrolled identity as it was"
        published = publish(tmp_path / "admin", coordinator.address, image, "production")
        fleet.wait_holds(node, published["version"])
        with fleet.channel(coordinator.address) as ch:
            nodes = fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10).nodes
        assert [n.node.node_id for n in nodes] == ["lab-1"]
