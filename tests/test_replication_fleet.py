"""A fleet in two sites follows os/x:production: every node converges on each published version,
byte for byte, and a block that a node of a site already holds does not cross the WAN again for
that site.

Real processes throughout: a coordinator, three `cachepoint serve` daemons (site a: a1 and a2, site
b: b1), `cachepoint publish` from an admin store, and `cachepoint status` / `export` against each
daemon's store.

Which node of site a moves first is fixed on purpose. When two nodes of a site receive the same
Watch event at the same moment, each asks the coordinator for holders before either holds the
version, so both fetch everything from the origin (no rendezvous within a site yet). The claim
tested here is the one the product makes today: a node that starts a pull after its site peer holds
the version takes the blocks from that peer and none from the coordinator. So a2 joins after a1
holds v1, and is stopped while v2 is published and restarted once a1 holds v2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachepoint.samples import generate, mutate
from tests.fleet import (
    LAYER,
    PRODUCTION,
    Fleet,
    Node,
    export_digest,
    publish,
    sha256_file,
    stored_block_ids,
)

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

IMAGE_SIZE = 24 * 1024 * 1024
CHANGED_FRACTION = 0.05


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet") as running:
        yield running


def source_blocks(status: dict[str, Any], source_class: str) -> int:
    return int(status["bytes_by_source"].get(source_class, {}).get("blocks", 0))


def wan_blocks(status: dict[str, Any]) -> int:
    """Blocks that came from outside the node's site: from the coordinator or from another site."""
    return source_blocks(status, "origin") + source_blocks(status, "peer")


def assert_exports_match(nodes: list[Node], expected: str, dest: Path, fleet: Fleet) -> None:
    dest.mkdir(parents=True)
    for node in nodes:
        digest = export_digest(node.store, PRODUCTION, dest / f"{node.name}.img")
        assert digest == expected, f"{node.name} exported different bytes\n{fleet.logs()}"


def test_three_nodes_in_two_sites_converge_on_each_version_and_a_site_fetches_each_new_block_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    admin = tmp_path / "admin"
    images = tmp_path / "images"
    exports = tmp_path / "exports"
    images.mkdir()

    coordinator = fleet.coordinator()
    a1 = fleet.cachepoint("a1", coordinator.address, site="a")
    b1 = fleet.cachepoint("b1", coordinator.address, site="b")

    # v1: a generated image of holes, text-like and random runs.
    v1_image = images / "v1.img"
    generate(v1_image, IMAGE_SIZE, seed=11)
    v1_ids = stored_block_ids(v1_image)
    published = publish(admin, coordinator.address, v1_image, "production")
    assert published["version"] == 1 and published["blocks_sent"] == len(v1_ids)

    for node in (a1, b1):
        fleet.wait_holds(node, 1)
    # a2 starts once the coordinator offers a1 as a holder of v1: its first pull then has a site peer.
    fleet.wait_fleet_holds(coordinator.address, "a1", f"{LAYER}@1")
    a2 = fleet.cachepoint("a2", coordinator.address, site="a")
    a2_status = fleet.wait_holds(a2, 1)
    assert source_blocks(a2_status, "origin") == 0, f"a2 fetched v1 blocks from the coordinator: {a2_status}"
    # Nearest first: a1 (same site) is preferred to b1 (other site), so nothing crossed the WAN.
    # (A first pull that races the node's own first Register may see a1 as a plain peer; either way
    # the blocks came from a node that held them, which is the claim.)
    assert source_blocks(a2_status, "site") + source_blocks(a2_status, "peer") == len(v1_ids), a2_status
    assert_exports_match([a1, a2, b1], sha256_file(v1_image), exports / "v1", fleet)

    # v2: 5% of the blocks rewritten. a2 is down while a1 fetches it, and comes back afterwards.
    assert a2.stop() == 0, a2.stderr()
    v2_image = images / "v2.img"
    mutate(v1_image, v2_image, CHANGED_FRACTION, seed=12)
    new_ids = stored_block_ids(v2_image) - v1_ids
    assert new_ids, "the mutation changed no stored block"
    a1_before = a1.status()
    published = publish(admin, coordinator.address, v2_image, "production")
    assert published["version"] == 2
    # The publisher sends the coordinator only the blocks it lacks.
    assert published["blocks_sent"] == len(new_ids), published

    a1_after = fleet.wait_holds(a1, 2)
    fleet.wait_holds(b1, 2)
    # Site a's first node fetched exactly v2's new blocks across the WAN, and only once each.
    assert wan_blocks(a1_after) - wan_blocks(a1_before) == len(new_ids), (a1_before, a1_after)

    fleet.wait_fleet_holds(coordinator.address, "a1", f"{LAYER}@2")
    a2 = fleet.cachepoint("a2", coordinator.address, site="a")  # same store: it still holds v1
    a2_status = fleet.wait_holds(a2, 2)
    # Its counters start at zero with the new process, so they describe the v2 pull alone: every new
    # block came from a1 in its own site, none from the coordinator or the other site.
    assert source_blocks(a2_status, "site") == len(new_ids), a2_status
    assert wan_blocks(a2_status) == 0, a2_status
    assert a2_status["subscriptions"][0]["last_error"] == ""

    assert_exports_match([a1, a2, b1], sha256_file(v2_image), exports / "v2", fleet)
    # Each node holds both versions (a version is never dropped by the move of a tag).
    for node in (a1, a2, b1):
        assert {f"{LAYER}@1", f"{LAYER}@2"} <= set(node.status()["versions"]), node.name
    assert all(child.running() for child in (coordinator, a1, a2, b1)), fleet.logs()


def test_a_subscription_to_a_layer_not_yet_published_follows_it_from_its_first_version(
    fleet: Fleet, tmp_path: Path
) -> None:
    coordinator = fleet.coordinator()
    node = fleet.cachepoint("early", coordinator.address)
    fleet.wait_until_state(node, "waiting for a first version")
    image = tmp_path / "v1.img"
    generate(image, 2 * 1024 * 1024, seed=21)
    publish(tmp_path / "admin", coordinator.address, image, "production")
    # Event-driven: the Watch stream delivers the first version; no retry backoff stands in between.
    # (A bound far above an event's delivery time, and far below the subscription's 30 s retry cap.)
    fleet.wait_holds(node, 1, timeout=20.0)
    assert node.subscription(node.status())["last_error"] == ""
