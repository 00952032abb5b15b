"""The suite runs its fleets with mutual TLS (tests/tls.py); a fleet without a CA still works as it
did before enrollment existed, and this keeps that mode tested in every run."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc
from tests.conftest import sha256_file
from tests.fleet import LAYER, Fleet, export_digest, publish, random_image

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1024 * 1024


def test_a_plaintext_fleet_replicates_a_published_version_to_its_nodes_and_their_site_peer(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 2 * MIB, seed=17)
    with Fleet(tmp_path / "fleet", tls_on=False) as fleet:
        coordinator = fleet.coordinator()
        assert "enroll" not in coordinator.ready, coordinator.ready  # no CA: no enrollment port
        first = fleet.cachepoint("first", coordinator.address, site="branch")
        published = publish(tmp_path / "admin", coordinator.address, image, "production")
        fleet.wait_holds(first, published["version"])
        fleet.wait_fleet_holds(coordinator.address, "first", f"{LAYER}@1")
        second = fleet.cachepoint("second", coordinator.address, site="branch")
        status = fleet.wait_holds(second, published["version"])
        # The second node of the site fetched from the first, peer to peer, in plaintext too.
        assert status["bytes_by_source"].get("site", {}).get("blocks", 0) > 0, status["bytes_by_source"]
        for node in (first, second):
            assert export_digest(node.store, "os/x:production", tmp_path / f"{node.name}.img") == sha256_file(
                image
            )
            assert not (node.store / "identity").exists()
        assert not (tmp_path / "admin" / "identity").exists()
        assert not (tmp_path / "fleet" / "coordinator" / "ca").exists()
        # Any client is served: nothing is authenticated without a CA.
        with grpc.insecure_channel(coordinator.address) as ch:
            nodes = fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=10).nodes
        assert {n.node.node_id for n in nodes} == {"first", "second"}
