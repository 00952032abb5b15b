"""Site fan-out on a fleet in network namespaces (tests/netns.py ``site_lan``): the coordinator in a
datacenter namespace, four cachepoints each in its own namespace on a site's bridge, the site's WAN a
veth shaped with tbf. The WAN bytes are read from the counters of the site's end of that veth.

The four nodes follow os/x:production at @1 (one block), so all of them hear of @2 from the same Watch
event, as a branch office's blades do when a patch is published. @2's blocks should cross the WAN once
for the site, not once per node (docs/design.md "Site fan-out"). Then a fifth node joins the site and
takes all of @2 from its site peers.

The harness runs here without TLS (plaintext gRPC between the namespaces).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachepoint.blocks import encode_block
from cachepoint.replication import rendezvous
from cachepoint.replication.fetcher import SHARE_STALL_SECONDS, STREAMS_PER_SOURCE
from cachepoint.rpc.channel import BATCH_BYTES
from cachepoint.store.store import Store
from tests.conftest import sha256_file
from tests.fleet import (
    BLOCK,
    LAYER,
    PRODUCTION,
    Fleet,
    Node,
    cli_json,
    coordinator_cli,
    publish,
    random_image,
    stored_block_ids,
    wait_until,
)
from tests.netns import DC_ADDRESS, SiteLan, site_lan

MiB = 1024 * 1024
NODES = 4
SITE = "branch"
WAN_RATE = "100mbit"
WAN_FACTOR = 1.1  # the acceptance bound: WAN bytes per site per version / the version's stored new bytes
KILL_WAN_RATE = "40mbit"  # @2 takes ~10 s to cross: time to kill a node in the middle
CUT_SITE_RATE = "64Mbit"  # the site as a whole in the WAN-cut test: 16 Mbit/s per node of the four
BUDGET_WAN_RATE = 16e6 / 8  # each node's wan_rate in the budget test, bytes per second
BUDGET_SLACK = 0.9  # the pullers' shares are unequal and each bucket starts with a small burst
CONTROL = 512 * 1024  # a joining node's heartbeats, Register, Watch, Resolve, manifest, FindPeers


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[tuple[SiteLan, Fleet]]:
    """The namespaces and the fleet in them; the fleet stops before the namespaces go, failed or not.
    Skipped, saying why, without root or iproute2."""
    with site_lan(NODES) as made, Fleet(tmp_path / "fleet") as fleet:
        yield made, fleet


def stored_bytes(store: Path, ids: set[bytes]) -> int:
    """The stored (compressed) size of ``ids``: what a fetch of them carries."""
    with Store.open(store) as opened:
        values = opened.blocks.raw_many(sorted(ids))
    assert all(value is not None for value in values)
    return sum(len(value) for value in values if value is not None)


def by_source(status: dict[str, Any], field: str) -> dict[str, int]:
    return {name: int(totals[field]) for name, totals in status["bytes_by_source"].items()}


def held(store: Path, ids: set[bytes]) -> set[bytes]:
    """Which of ``ids`` the store holds (read-only, beside its running daemon)."""
    with Store.open(store) as opened:
        return {digest for digest in ids if opened.blocks.has(digest)}


def present(store: Path, ids: set[bytes]) -> int:
    """How many of ``ids`` the store holds (read-only, beside its running daemon)."""
    with Store.open(store) as opened:
        return sum(1 for digest in ids if opened.blocks.has(digest))


@dataclass
class Published:
    """The fleet at @1 everywhere, and @2 just published: what the nodes' counters said before it."""

    coordinator: str
    admin: Path
    image: Path
    new_ids: set[bytes]
    nodes: list[Node]
    before: list[dict[str, Any]]
    received_before: int


def enroll(
    fleet: Fleet, store: Path, coordinator: str, name: str, prefix: tuple[str, ...], *args: str
) -> None:
    """A one-time token for ``name`` from the coordinator's data, spent from ``prefix``'s namespace."""
    made = coordinator_cli("enroll", name, "--data", str(fleet.root / "coordinator"), *args, "--json").json()
    assert isinstance(made, dict), made
    cli_json(store, "enroll", "--coordinator", coordinator, "--token", str(made["token"]), prefix=prefix)


def publish_to_the_site(
    site: SiteLan,
    fleet: Fleet,
    tmp_path: Path,
    rate: str,
    size: int,
    tls: bool = False,
    config: Path | None = None,
    before_publish: Callable[[str, list[Node], set[bytes]], list[Node]] | None = None,
) -> Published:
    """The coordinator in the datacenter, one node per node namespace following os/x:production at @1
    (one block), then @2 (``size`` bytes of distinct random blocks) published from the datacenter,
    so that every node hears of it from the same Watch event. ``tls``: the coordinator serves mutual
    TLS and every node and the publisher are enrolled (peers dial each other by address); ``config``:
    the nodes' settings file; ``before_publish``: given the coordinator, the nodes once they hold @1
    and @2's new block ids, returns the nodes to publish to (e.g. one restarted with a damaged store)."""
    dc = site.dc.exec_prefix
    site.wan.shape(rate)
    extra = ["--tls"] if tls else []
    coordinator = fleet.coordinator(listen=f"{DC_ADDRESS}:0", prefix=dc, extra=extra).address
    admin = tmp_path / "admin"  # the publisher works in the datacenter: its pushes never cross the WAN
    if tls:
        enroll(fleet, admin, coordinator, "release-bot", dc, "--role", "publisher")
        for index, ns in enumerate(site.nodes, start=1):
            enroll(fleet, fleet.root / f"n{index}", coordinator, f"n{index}", ns.exec_prefix, "--site", SITE)

    def publish(image: Path) -> int:
        done = cli_json(admin, "publish", LAYER, image, "--coordinator", coordinator, "--tag", "production",
                        prefix=dc)  # fmt: skip
        return int(done["version"])

    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    random_image(v1, 64 * 1024, seed=71)
    random_image(v2, size, seed=72)
    assert publish(v1) == 1
    nodes: list[Node] = []
    for index, ns in enumerate(site.nodes, start=1):
        listen = f"{site.node_address(index)}:0"
        node = fleet.cachepoint(
            f"n{index}", coordinator, site=SITE, listen=listen, prefix=ns.exec_prefix, config=config
        )
        nodes.append(node)
    before = [fleet.wait_holds(node, 1) for node in nodes]
    new_ids = stored_block_ids(v2) - stored_block_ids(v1)
    if before_publish is not None:
        nodes = before_publish(coordinator, nodes, new_ids)
        before = [fleet.wait_holds(node, 1) for node in nodes]
    received_before = site.wan.site_received_bytes()
    assert publish(v2) == 2
    return Published(coordinator, admin, v2, new_ids, nodes, before, received_before)


def grown(before: dict[str, Any], now: dict[str, Any]) -> dict[str, int]:
    """Blocks fetched per class of source between two statuses (the counters are totals since start)."""
    was = by_source(before, "blocks")
    return {cls: count - was.get(cls, 0) for cls, count in by_source(now, "blocks").items()}


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


def test_a_node_killed_in_the_middle_of_a_fan_out_has_its_share_taken_over_and_the_others_finish(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    run = publish_to_the_site(site, fleet, tmp_path, KILL_WAN_RATE, 48 * MiB)
    nodes, new_ids = run.nodes, run.new_ids
    victim, survivors = nodes[1], [nodes[0], *nodes[2:]]

    # The victim dies once it holds a tenth of the version: its share is partly fetched, partly not.
    def started() -> int | None:
        try:
            held = present(victim.store, new_ids)
        except Exception:  # the store is busy being written: ask again
            return None
        return held if held >= len(new_ids) // 10 else None

    wait_until("the victim to hold a tenth of @2", started, 120, interval=0.1, logs=fleet.logs)
    victim.kill()
    held_at_kill = present(victim.store, new_ids)
    behind = [present(node.store, new_ids) for node in survivors]
    assert held_at_kill < len(new_ids), "the victim had everything: the test proves nothing"
    assert all(count < len(new_ids) for count in behind), f"a survivor had finished already: {behind}"

    done = [fleet.wait_holds(node, 2) for node in survivors]
    received = site.wan.site_received_bytes() - run.received_before
    new_bytes = stored_bytes(run.admin, new_ids)
    counts = [grown(was, now) for was, now in zip([run.before[0], *run.before[2:]], done, strict=True)]
    failures = [by_source(now, "failures").get("site", 0) for now in done]
    print(json.dumps({"victim_held": held_at_kill, "survivors_held_at_kill": behind, "counts": counts,
                      "site_failures": failures, "wan": received, "new_bytes": new_bytes}))  # fmt: skip
    # Each survivor dropped the dead puller and took its share over (from the origin or another peer).
    assert all(f >= 1 for f in failures), failures
    for index, node in enumerate(survivors):
        export = tmp_path / f"{node.name}-export.img"
        node.cli_json("export", PRODUCTION, export)
        assert sha256_file(export) == sha256_file(run.image), index
    # The WAN carried the version about once, plus at most what the victim had fetched and took with it.
    victim_bytes = held_at_kill * (new_bytes // len(new_ids) + 1)
    assert received <= (new_bytes + victim_bytes) * WAN_FACTOR, (received, new_bytes, victim_bytes)


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


def test_a_wan_cut_mid_fan_out_leaves_the_site_exchanging_what_it_has_and_nothing_crosses_twice(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    # Peers take their shares from each other slower than the WAN brings them, so that at the cut
    # some nodes hold blocks the others have not taken yet.
    config = tmp_path / "nodes.toml"
    config.write_text(f'site_rate = "{CUT_SITE_RATE}"\n')
    run = publish_to_the_site(site, fleet, tmp_path, KILL_WAN_RATE, 48 * MiB, config=config)
    nodes, new_ids = run.nodes, run.new_ids
    new_bytes = stored_bytes(run.admin, new_ids)

    def a_third_across() -> int | None:
        across = site.wan.site_received_bytes() - run.received_before
        return across if across >= new_bytes // 3 else None

    wait_until("a third of @2 to cross the WAN", a_third_across, 120, interval=0.1, logs=fleet.logs)
    site.wan.cut()
    cut_at = time.monotonic()
    at_cut = [held(node.store, new_ids) for node in nodes]
    assert all(len(h) < len(new_ids) for h in at_cut), "a node had finished: the test proves nothing"

    # With the WAN down, the nodes take from each other what any of them holds.
    def exchanged() -> set[bytes] | None:
        now = [held(node.store, new_ids) for node in nodes]
        return now[0] if all(h == now[0] for h in now) and now[0] >= set().union(*at_cut) else None

    shared = wait_until("the site to exchange what crossed", exchanged, 60, interval=0.5, logs=fleet.logs)
    assert not site.wan.is_up()
    # Peers share as they fetch, so at the cut they were close: some took the last blocks from others.
    assert any(len(shared) > len(h) for h in at_cut), ([len(h) for h in at_cut], len(shared))
    assert len(shared) < len(new_ids), "everything crossed before the cut: the test proves nothing"
    # Down longer than a stalled owner's grace: every owner stalls at once, and a node that took the
    # others' shares over would fetch them again once the link returns (the WAN's own failure, not theirs).
    time.sleep(max(0.0, cut_at + SHARE_STALL_SECONDS + 3 - time.monotonic()))
    assert not site.wan.is_up()

    site.wan.restore()
    done = [fleet.wait_holds(node, 2) for node in nodes]
    received = site.wan.site_received_bytes() - run.received_before
    # Once, plus headers, plus at most the batch each node's origin streams were receiving at the cut.
    in_flight = len(nodes) * STREAMS_PER_SOURCE * (BATCH_BYTES + BLOCK)
    counts = [grown(was, now) for was, now in zip(run.before, done, strict=True)]
    print(json.dumps({"cut_held": [len(h) for h in at_cut], "shared": len(shared), "wan": received,
                      "new_bytes": new_bytes, "in_flight": in_flight, "counts": counts}))  # fmt: skip
    assert new_bytes <= received <= new_bytes * WAN_FACTOR + in_flight, (received, new_bytes)
    export = tmp_path / "n3-export.img"
    nodes[2].cli_json("export", PRODUCTION, export)
    assert sha256_file(export) == sha256_file(run.image)


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


def plant_corrupt_blocks(store: Path, ids: set[bytes]) -> None:
    """Store under each of ``ids`` a well-formed value that is not its block: what a disk or a bug that
    RocksDB's checksums cannot see leaves behind (the values are written through the database, so its
    checksums match). Local reads trust those checksums and do not hash, so FetchBlocks serves them."""
    with Store.open(store, writable=True) as opened:
        wrong = [(digest, encode_block(digest * (BLOCK // len(digest)))) for digest in ids]
        opened.blocks.put_many(wrong, True)


def test_a_node_of_the_site_that_serves_corrupt_blocks_is_dropped_and_its_share_comes_from_elsewhere(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    bad_name = "n2"
    planted: set[bytes] = set()

    def damage(coordinator: str, nodes: list[Node], new_ids: set[bytes]) -> list[Node]:
        """n2 comes back with wrong bytes stored under the blocks of @2 the rendezvous gives it: it holds
        its share already (it does not fetch it), and serves it corrupt the moment its peers ask."""
        index = next(i for i, node in enumerate(nodes) if node.name == bad_name)
        bad = nodes[index]
        bad.stop()
        share = rendezvous.split(sorted(new_ids), [node.node_id for node in nodes])[bad.node_id]
        plant_corrupt_blocks(bad.store, set(share))
        planted.update(share)
        ns, address = site.nodes[index], site.node_address(index + 1)
        again = fleet.cachepoint(bad_name, coordinator, site=SITE, listen=f"{address}:0",
                                 prefix=ns.exec_prefix, store=bad.store)  # fmt: skip
        return [*nodes[:index], again, *nodes[index + 1 :]]

    run = publish_to_the_site(site, fleet, tmp_path, WAN_RATE, 16 * MiB, before_publish=damage)
    assert planted and planted < run.new_ids, "n2 should hold a share of @2, not all of it"
    good = [node for node in run.nodes if node.name != bad_name]
    done = [fleet.wait_holds(node, 2) for node in good]
    received = site.wan.site_received_bytes() - run.received_before
    new_bytes = stored_bytes(run.admin, run.new_ids)
    corrupt = [by_source(now, "corrupt").get("site", 0) for now in done]
    counts = [grown(was, now) for was, now in zip([run.before[0], *run.before[2:]], done, strict=True)]
    print(json.dumps({"planted": len(planted), "corrupt_sources": corrupt, "counts": counts,
                      "wan": received, "new_bytes": new_bytes}))  # fmt: skip
    # The fault landed: every other node asked n2 for its share, got bytes that failed their hash, and
    # dropped it (status counts the source dropped for corruption).
    assert all(count >= 1 for count in corrupt), corrupt
    # What n2 owned came from elsewhere (its share split over the others, fetched once from the origin),
    # and no corrupt byte was kept: every other node holds @2 byte for byte.
    for node in good:
        export = tmp_path / f"{node.name}-export.img"
        node.cli_json("export", PRODUCTION, export)
        assert sha256_file(export) == sha256_file(run.image), node.name
    assert new_bytes <= received <= new_bytes * WAN_FACTOR, (received, new_bytes)


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
