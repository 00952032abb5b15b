"""A WAN partition between a site and the datacenter in the middle of a pull, on a fleet in network
namespaces (tests/netns.py): the coordinator in "dc", two cachepoint daemons in "site", a shaped veth
between them that the test cuts and restores.

Node a holds os/x@1 (it follows os/x:stable). Node b follows os/x:production, which names @2: @1's
blocks plus as many new ones. b takes @1's blocks from a (its site peer, which holds @2's parent) and
the new ones from the coordinator across the WAN. The WAN goes down while both transfers run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachepoint.replication.fetcher import STREAMS_PER_SOURCE
from cachepoint.rpc.channel import BATCH_BYTES
from cachepoint.store.store import Store
from tests.conftest import sha256_file
from tests.fleet import (
    BLOCK,
    LAYER,
    PRODUCTION,
    Fleet,
    cli_json,
    coordinator_cli,
    random_image,
    stored_block_ids,
    wait_until,
)
from tests.netns import DC_ADDRESS, WanLink, wan_link
from tests.site import PEEKABLE

MiB = 1024 * 1024
STABLE = f"{LAYER}:stable"
HOME = "user/alice/home"
WAN_RATE = "40mbit"  # ~5 MB/s: the new half of @2 (16 MiB) takes ~3.5 s to cross
SITE_RATE = "16Mbit"  # b's cap on fetching from its site peer: @1's half takes ~8 s from a
PARTITION_TIMEOUT = 60.0  # until b's pull has given up on the origin (it waits out a 10 s stall)
HEADERS = 0.06  # Ethernet, IP and TCP headers on the WAN: ~66 bytes a 1448-byte segment, rounded up
CONTROL = 512 * 1024  # heartbeats, Watch, Resolve, the manifest, the outbox's replies while b runs


@pytest.fixture
def wan(tmp_path: Path) -> Iterator[tuple[WanLink, Fleet]]:
    """The namespaces and the fleet in them; the fleet stops before the namespaces go, failed or not.
    Skipped, saying why, without root or iproute2."""
    with wan_link() as link, Fleet(tmp_path / "fleet") as fleet:
        yield link, fleet


def present(store: Path, ids: set[bytes]) -> int:
    """How many of ``ids`` the store holds (read-only, beside its running daemon)."""
    with Store.open(store) as opened:
        return sum(1 for digest in ids if opened.blocks.has(digest))


def stored_bytes(store: Path, ids: set[bytes]) -> int:
    """The stored (compressed) size of ``ids``: what a fetch of them carries."""
    with Store.open(store) as opened:
        values = opened.blocks.raw_many(sorted(ids))
    assert all(value is not None for value in values)
    return sum(len(value) for value in values if value is not None)


def fetched(status: dict[str, Any], field: str) -> dict[str, int]:
    return {name: int(totals[field]) for name, totals in status["bytes_by_source"].items()}


def test_a_partition_mid_pull_keeps_site_peers_serving_and_the_pull_resumes_without_doubling_anything(
    wan: tuple[WanLink, Fleet], tmp_path: Path
) -> None:
    link, fleet = wan
    dc, site = link.dc.exec_prefix, link.site.exec_prefix
    link.shape(WAN_RATE)
    coordinator = fleet.coordinator(listen=f"{DC_ADDRESS}:0", prefix=dc)
    address = coordinator.address
    admin = tmp_path / "admin"  # the publisher works in the datacenter

    # @1: 16 MiB of distinct random blocks; @2: the same blocks, then 16 MiB of new ones.
    v1_image, v2_image, extra = tmp_path / "v1.img", tmp_path / "v2.img", tmp_path / "extra.img"
    random_image(v1_image, 16 * MiB, seed=61)
    random_image(extra, 16 * MiB, seed=62)
    with open(v2_image, "wb") as out:
        out.write(v1_image.read_bytes() + extra.read_bytes())
    v1_ids, v2_ids = stored_block_ids(v1_image), stored_block_ids(v2_image)
    new_ids = v2_ids - v1_ids
    assert len(v1_ids) == len(new_ids) == 16 * MiB // BLOCK

    # a published @1 itself, from the site (its store keeps what it publishes): it holds @1 complete.
    a_store = tmp_path / "a"
    published = cli_json(
        a_store, "publish", LAYER, v1_image, "--coordinator", address, "--tag", "stable", prefix=site
    )
    assert published["version"] == 1
    a = fleet.cachepoint(
        "a",
        address,
        site="branch",
        subscribe=(STABLE,),
        store=a_store,
        listen=f"{link.add_node_address(1)}:0",
        prefix=site,
    )
    fleet.wait_holds(a, 1, ref=STABLE)
    fleet.wait_fleet_holds(address, "a", f"{LAYER}@1", prefix=dc)
    published = cli_json(
        admin, "publish", LAYER, v2_image, "--coordinator", address, "--tag", "production", prefix=dc
    )
    assert published["version"] == 2

    config = tmp_path / "b.toml"
    config.write_text(f'site_rate = "{SITE_RATE}"\n{PEEKABLE}')  # b's store is read while it pulls
    received_before = link.site_received_bytes()
    b = fleet.cachepoint(
        "b",
        address,
        site="branch",
        subscribe=(PRODUCTION,),
        listen=f"{link.add_node_address(2)}:0",
        prefix=site,
        config=config,
    )

    # The WAN goes down once a third of the new blocks have crossed it, while a is still sending.
    def a_third_across() -> tuple[int, int] | None:
        try:
            counts = present(b.store, new_ids), present(b.store, v1_ids)
        except Exception:  # the daemon is creating its store
            return None
        return counts if counts[0] >= len(new_ids) // 3 else None

    across_at_cut, from_a_at_cut = wait_until(
        "b to fetch a third of the new blocks", a_third_across, 60, interval=0.1, logs=fleet.logs
    )
    link.cut()
    assert from_a_at_cut < len(v1_ids), "a had sent everything before the cut: the test proves nothing"
    assert across_at_cut < len(new_ids), "the pull finished before the cut: the test proves nothing"

    # Peers keep serving each other: b goes on taking from a everything a holds.
    wait_until(
        "b to fetch every block a holds, with the WAN down",
        lambda: present(b.store, v1_ids) == len(v1_ids) or None,
        PARTITION_TIMEOUT,
        logs=fleet.logs,
    )
    assert not link.is_up()
    # Whatever was in flight when the link went down is all that arrived from the other side.
    across_in_partition = present(b.store, new_ids)
    assert across_in_partition < len(new_ids)

    # A version made on b while it is cut off waits in its outbox.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("written during the partition")
    b.assign("alice")  # with TLS, the coordinator takes alice's versions from a node assigned to her
    made = b.cli_json("ingest", HOME, home, "-m", "during the partition")
    assert made["version"] == 1

    def b_gave_up() -> dict[str, Any] | None:
        status = b.status()
        sub = b.subscription(status)
        waiting = sub["state"] == "waiting" and sub["last_error"] and not status["coordinator_connected"]
        return status if waiting and status["outbox_depth"] == 1 else None

    cut_off = wait_until("b to report the WAN unreachable", b_gave_up, PARTITION_TIMEOUT, logs=fleet.logs)
    assert cut_off["subscriptions"][0]["held"] == 0
    assert present(b.store, new_ids) == across_in_partition, "blocks crossed a WAN that was down"
    assert a.running() and b.running(), fleet.logs()

    link.restore()
    done = fleet.wait_holds(b, 2)
    wait_until("b's outbox to drain", lambda: b.status()["outbox_depth"] == 0 or None, 90, logs=fleet.logs)
    done = b.status()
    received = link.site_received_bytes() - received_before

    # The export is byte for byte @2.
    export = tmp_path / "b-export.img"
    b.cli_json("export", PRODUCTION, export)
    assert sha256_file(export) == sha256_file(v2_image)

    # Nothing fetched twice: b's counters (which include the pull that failed) add up to @2's blocks
    # exactly, @1's from its site peer and only the new ones from the coordinator.
    blocks, sizes = fetched(done, "blocks"), fetched(done, "bytes")
    assert blocks.get("site", 0) == len(v1_ids), done["bytes_by_source"]
    assert blocks.get("origin", 0) + blocks.get("peer", 0) == len(new_ids), done["bytes_by_source"]
    assert sum(sizes.values()) == stored_bytes(admin, v2_ids), done["bytes_by_source"]
    # And on the wire: the WAN carried the new blocks' stored bytes once, plus headers, control
    # traffic, and at most the batch each origin stream was receiving when the link went down (cut
    # mid-message, it never completed, so its blocks were asked for again).
    new_bytes = stored_bytes(admin, new_ids)
    in_flight = STREAMS_PER_SOURCE * (BATCH_BYTES + BLOCK)
    bound = int(new_bytes * (1 + HEADERS)) + in_flight + CONTROL
    print(json.dumps({"wan_received": received, "new_blocks_stored_bytes": new_bytes, "bound": bound}))
    assert new_bytes <= received <= bound, (received, new_bytes, bound)

    # Nothing doubled at the coordinator: b's version landed once, after the link came back.
    versions = timeline(address, dc)
    assert [(v["device"], v["message"]) for v in versions] == [("b", "during the partition")], versions


def timeline(address: str, prefix: tuple[str, ...]) -> list[dict[str, Any]]:
    run = coordinator_cli("history", "timeline", "alice", "--coordinator", address, "--json", prefix=prefix)
    data = run.json()
    assert isinstance(data, dict)
    return list(data["versions"])
