"""Site fan-out on a fleet in network namespaces (tests/site.py): the coordinator in a datacenter
namespace, four cachepoints each in its own namespace on a site's bridge, the site's WAN a veth shaped
with tbf. The WAN bytes are read from the counters of the site's end of that veth.

The four nodes follow os/x:production at @1 (one block), so all of them hear of @2 from the same Watch
event, as a branch office's blades do when a patch is published. @2's blocks should cross the WAN once
for the site, not once per node (docs/design.md "Site fan-out"). Then a fifth node joins the site and
takes all of @2 from its site peers. Faults in the middle of a fan-out (a node killed, the WAN cut, a
node serving corrupt blocks) are in tests/test_site_fanout_faults.py: two files, so that two test
workers can run them side by side.

The harness runs here without TLS (plaintext gRPC between the namespaces) unless a test says otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import sha256_file
from tests.fleet import LAYER, PRODUCTION, Fleet, publish, random_image, stored_block_ids
from tests.netns import SiteLan
from tests.site import (
    SITE,
    WAN_FACTOR,
    WAN_RATE,
    MiB,
    by_source,
    grown,
    publish_to_the_site,
    site_fleet,
    stored_bytes,
)

BUDGET_WAN_RATE = 16e6 / 8  # each node's wan_rate in the budget test, bytes per second
BUDGET_SLACK = 0.9  # the pullers' shares are unequal and each bucket starts with a small burst
CONTROL = 512 * 1024  # a joining node's heartbeats, Register, Watch, Resolve, manifest, FindPeers


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[tuple[SiteLan, Fleet]]:
    """The site's namespaces and the fleet in them (tests/site.py)."""
    with site_fleet(tmp_path) as made:
        yield made


def test_four_nodes_of_a_site_pull_a_version_across_the_wan_once_and_a_late_joiner_takes_it_from_the_site(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    dc = site.dc.exec_prefix
    run = publish_to_the_site(site, fleet, tmp_path, WAN_RATE, 32 * MiB)
    nodes, new_ids = run.nodes, run.new_ids
    done = [fleet.wait_holds(node, 2) for node in nodes]
    received = site.wan.site_received_bytes() - run.received_before

    new_bytes = stored_bytes(run.admin, new_ids)
    counts = [grown(was, now) for was, now in zip(run.before, done, strict=True)]
    from_origin = [c.get("origin", 0) for c in counts]
    from_site = [c.get("site", 0) for c in counts]
    print(json.dumps({"wan_received": received, "new_blocks_stored_bytes": new_bytes,
                      "ratio": round(received / new_bytes, 3), "origin_blocks": from_origin,
                      "site_blocks": from_site}))  # fmt: skip
    # Each node holds all of @2, and every block crossed the WAN about once for the site: the nodes
    # shared the fetch (each took some from the origin, the rest from its site peers).
    assert all(o + s == len(new_ids) for o, s in zip(from_origin, from_site, strict=True)), counts
    assert sum(from_origin) <= len(new_ids) * WAN_FACTOR, from_origin
    assert all(o > 0 for o in from_origin) and all(s > 0 for s in from_site), (from_origin, from_site)
    assert new_bytes <= received <= new_bytes * WAN_FACTOR, (received, new_bytes)
    export = tmp_path / "n1-export.img"
    nodes[0].cli_json("export", PRODUCTION, export)
    assert sha256_file(export) == sha256_file(run.image)

    # A node that joins the site after the fan-out: its site peers hold @2 complete, the WAN carries
    # only its control traffic.
    for node in nodes:
        fleet.wait_fleet_holds(run.coordinator, node.node_id, f"{LAYER}@2", prefix=dc)
    ns, address = site.add_node()
    received_before = site.wan.site_received_bytes()
    late = fleet.cachepoint("late", run.coordinator, site=SITE, listen=f"{address}:0", prefix=ns.exec_prefix)
    joined = fleet.wait_holds(late, 2)
    received = site.wan.site_received_bytes() - received_before
    print(json.dumps({"late_wan_received": received, "late_sources": joined["bytes_by_source"]}))
    assert by_source(joined, "blocks").get("site", 0) == len(new_ids), joined["bytes_by_source"]
    assert sum(by_source(joined, "bytes").get(cls, 0) for cls in ("origin", "peer")) == 0, joined
    assert received < CONTROL, received


def test_with_mutual_tls_the_pullers_of_a_site_answer_each_other_for_a_version_they_do_not_hold_yet(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    run = publish_to_the_site(site, fleet, tmp_path, WAN_RATE, 16 * MiB, tls=True)
    done = [fleet.wait_holds(node, 2) for node in run.nodes]
    received = site.wan.site_received_bytes() - run.received_before
    new_bytes = stored_bytes(run.admin, run.new_ids)
    counts = [grown(was, now) for was, now in zip(run.before, done, strict=True)]
    print(json.dumps({"tls_wan_received": received, "new_bytes": new_bytes, "counts": counts}))
    # Each partial holder answered its peers over the peers' mutual TLS (not "missing" until its
    # share was taken over): the site fetched the version about once.
    assert all(c.get("site", 0) > 0 for c in counts), counts
    assert sum(c.get("origin", 0) for c in counts) <= len(run.new_ids) * WAN_FACTOR, counts
    assert new_bytes <= received <= new_bytes * WAN_FACTOR, (received, new_bytes)


def test_wan_rate_holds_for_the_site_as_a_whole_while_its_nodes_pull_together(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    config = tmp_path / "nodes.toml"
    config.write_text(f'wan_rate = "{BUDGET_WAN_RATE * 8 / 1e6:.0f}Mbit"\n')
    # The link itself is much faster than one node's wan_rate: only the nodes' budgets hold the site.
    run = publish_to_the_site(site, fleet, tmp_path, "640mbit", 32 * MiB, config=config)
    published_at = time.monotonic()
    for node in run.nodes:
        fleet.wait_holds(node, 2)
    elapsed = time.monotonic() - published_at
    new_bytes = stored_bytes(run.admin, run.new_ids)
    # What a rate limit promises is a lower bound on time, which no machine breaks by being slow: the
    # site consumed @2 from the WAN at most at one node's wan_rate (each puller paying its part). The
    # link's and gRPC's buffers may run ahead of a pull, never the pull ahead of its budget.
    floor = new_bytes / BUDGET_WAN_RATE * BUDGET_SLACK
    print(json.dumps({"elapsed": round(elapsed, 2), "floor": round(floor, 2), "new_bytes": new_bytes}))
    assert elapsed >= floor, (elapsed, floor)


def test_with_site_fanout_off_the_nodes_of_a_site_each_fetch_a_new_version_alone(tmp_path: Path) -> None:
    # On loopback: what is checked is who each node asked, not what crossed a link.
    config = tmp_path / "nodes.toml"
    config.write_text("site_fanout = false\n")
    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    random_image(v1, 64 * 1024, seed=71)
    random_image(v2, 8 * MiB, seed=72)
    new_ids = stored_block_ids(v2) - stored_block_ids(v1)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator().address
        admin = tmp_path / "admin"
        publish(admin, coordinator, v1, "production")
        nodes = [fleet.cachepoint(f"n{i}", coordinator, site=SITE, config=config) for i in (1, 2)]
        before = [fleet.wait_holds(node, 1) for node in nodes]
        publish(admin, coordinator, v2, "production")
        done = [fleet.wait_holds(node, 2) for node in nodes]
    counts = [grown(was, now) for was, now in zip(before, done, strict=True)]
    # Told of @2 by the same event, neither waited for the other nor asked it for a share: each took
    # every new block from the origin (with the switch on they split them, as the tests above show).
    assert all(c.get("origin", 0) == len(new_ids) and c.get("site", 0) == 0 for c in counts), counts
