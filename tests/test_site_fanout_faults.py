"""Faults in the middle of a site fan-out on a fleet in network namespaces (tests/site.py): a node
killed, the site's WAN cut, a node that serves corrupt blocks. The fleet runs as in
tests/test_site_fanout.py (the coordinator in a datacenter namespace, four cachepoints on a site's
bridge behind a WAN veth shaped with tbf), plaintext gRPC between the namespaces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachepoint.blocks import encode_block
from cachepoint.replication import rendezvous
from cachepoint.replication.fetcher import SHARE_STALL_SECONDS, STREAMS_PER_SOURCE
from cachepoint.rpc.channel import BATCH_BYTES
from cachepoint.store.store import Store
from tests.conftest import sha256_file
from tests.fleet import BLOCK, PRODUCTION, Fleet, Node, wait_until
from tests.netns import SiteLan
from tests.site import (
    PEEKABLE,
    SITE,
    WAN_FACTOR,
    WAN_RATE,
    MiB,
    by_source,
    grown,
    held,
    present,
    publish_to_the_site,
    site_fleet,
    stored_bytes,
)

KILL_WAN_RATE = "40mbit"  # @2 takes ~10 s to cross: time to kill a node in the middle
CUT_SITE_RATE = "64Mbit"  # the site as a whole in the WAN-cut test: 16 Mbit/s per node of the four


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[tuple[SiteLan, Fleet]]:
    """The site's namespaces and the fleet in them (tests/site.py)."""
    with site_fleet(tmp_path) as made:
        yield made


def test_a_node_killed_in_the_middle_of_a_fan_out_has_its_share_taken_over_and_the_others_finish(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    config = tmp_path / "nodes.toml"
    config.write_text(PEEKABLE)
    run = publish_to_the_site(site, fleet, tmp_path, KILL_WAN_RATE, 48 * MiB, config=config)
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


def test_a_wan_cut_mid_fan_out_leaves_the_site_exchanging_what_it_has_and_nothing_crosses_twice(
    lan: tuple[SiteLan, Fleet], tmp_path: Path
) -> None:
    site, fleet = lan
    # Peers take their shares from each other slower than the WAN brings them, so that at the cut
    # some nodes hold blocks the others have not taken yet.
    config = tmp_path / "nodes.toml"
    config.write_text(f'site_rate = "{CUT_SITE_RATE}"\n{PEEKABLE}')
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
