"""The fleet registry replicas share in PostgreSQL (coordinator/fleet/shared.py): the same answers as the
in-memory registry, and a node registered through one replica is found, listed, shown on the dashboard
and kept by the others."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cachepoint.v1 import fleet_pb2, fleet_pb2_grpc, version_pb2
from coordinator.fleet.registry import STALE_AFTER_NS, FleetRegistry, NodeReport, Registry, UnknownNode
from coordinator.fleet.shared import SharedRegistry
from tests.fleet import BLOCK, LAYER, Fleet, fleet_nodes, publish, random_image, wait_until
from tests.replicas import open_shared, start_replicas

REF = f"{LAYER}@1"
T = TypeVar("T")


async def _answers(registry: FleetRegistry) -> dict[str, object]:
    """One scripted fleet: what FindPeers and the listing make of it."""
    for node_id, site in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("b2", "B")):
        await registry.register_node(node_id, site, f"127.0.0.1:{7400 + len(node_id + site)}")
    await registry.record_heartbeat("a1", {REF}, 5, NodeReport(software="t", outbox_depth=3))
    await registry.record_heartbeat("a2", {REF, "os/y@2"}, 1, None)
    await registry.record_heartbeat("b1", {REF}, 0, None)
    await registry.record_heartbeat("b2", set(), 0, None)
    await registry.record_pulling("a3", REF)
    await registry.record_pulling("b2", REF)
    await registry.record_heartbeat("a1", {REF}, 2, None)  # a heartbeat without a report keeps it
    with pytest.raises(UnknownNode):
        await registry.record_heartbeat("stranger", set(), 0, None)
    with pytest.raises(UnknownNode):
        await registry.record_pulling("stranger", REF)
    if isinstance(registry, SharedRegistry):
        await registry.flush()
    holders = await registry.find_holders("a3", REF, 64)
    everyone = await registry.find_holders("b2", None, 2)
    pullers_a = await registry.find_pullers("a1", REF)
    await registry.record_heartbeat("a3", {REF}, 0, None)  # a3 completes its pull
    if isinstance(registry, SharedRegistry):
        await registry.flush()
    listed = {n.node_id: n for n in await registry.list_nodes()}
    return {
        "holders": [(n.node_id, same, n.load) for n, same in holders],
        "everyone": [(n.node_id, same) for n, same in everyone],
        "pullers": [n.node_id for n in pullers_a],
        "pullers after completion": [n.node_id for n in await registry.find_pullers("a1", REF)],
        "a1 report": (listed["a1"].report.software, listed["a1"].report.outbox_depth),
        "complete": {k: sorted(n.complete) for k, n in listed.items()},
        "pulling": {k: sorted(n.pulling) for k, n in listed.items()},
        "counts": dict(await registry.count_by_state()),
    }


def with_shared_registry(
    tmp_path: Path, postgres_dsn: str, body: Callable[[SharedRegistry], Awaitable[T]]
) -> T:
    """``body`` run on a SharedRegistry over a migrated database, heartbeats flushed by hand."""
    store = open_shared(postgres_dsn, tmp_path / "blocks", tmp_path / "data")  # applies the migrations
    store.close()

    async def run() -> T:
        registry = SharedRegistry(postgres_dsn, "test", flush_s=3600)
        await registry.start()
        try:
            return await body(registry)
        finally:
            await registry.close()

    return asyncio.run(run())


def test_the_shared_registry_answers_as_the_in_memory_one(tmp_path: Path, postgres_dsn: str) -> None:
    expected = asyncio.run(_answers(Registry()))
    assert expected["holders"] == [("a2", True, 1), ("a1", True, 2), ("b1", False, 0)]
    assert expected["pullers"] == ["a3"]
    assert with_shared_registry(tmp_path, postgres_dsn, _answers) == expected


def test_a_node_whose_row_is_gone_from_the_shared_registry_is_told_to_register_again(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """As after an embedded coordinator's restart: e.g. the database was restored from before it came."""

    async def body(registry: SharedRegistry) -> None:
        await registry.register_node("n1", "A", "127.0.0.1:7401")
        async with registry.pool.connection() as conn:
            await conn.execute("DELETE FROM nodes WHERE node_id = 'n1'")
        await registry.record_heartbeat("n1", {REF}, 0, None)  # known here: taken, then not written
        assert await registry.flush() == 0
        with pytest.raises(UnknownNode):
            await registry.record_heartbeat("n1", {REF}, 0, None)

    with_shared_registry(tmp_path, postgres_dsn, body)


async def _forgotten(registry: FleetRegistry) -> dict[str, object]:
    """Nodes silent since before a moment are forgotten, the others kept; a forgotten node's next
    heartbeat is refused (it registers again)."""
    await registry.register_node("gone", "A", "127.0.0.1:7401")
    await registry.register_node("kept", "A", "127.0.0.1:7402")
    await asyncio.sleep(0.01)
    cut = time.time_ns()
    await asyncio.sleep(0.01)
    await registry.record_heartbeat("kept", {REF}, 0, None)
    if isinstance(registry, SharedRegistry):
        await registry.flush()
    forgotten = await registry.forget_silent(cut)
    refused = False
    try:
        await registry.record_heartbeat("gone", set(), 0, None)
    except UnknownNode:
        refused = True
    again = await registry.forget_silent(cut)
    return {
        "forgotten": forgotten,
        "listed": sorted(n.node_id for n in await registry.list_nodes()),
        "refused": refused,
        "again": again,
    }


def test_nodes_silent_since_a_moment_are_forgotten_alike_by_both_registries(
    tmp_path: Path, postgres_dsn: str
) -> None:
    expected = asyncio.run(_forgotten(Registry()))
    assert expected == {"forgotten": ["gone"], "listed": ["kept"], "refused": True, "again": []}
    assert with_shared_registry(tmp_path, postgres_dsn, _forgotten) == expected


def test_a_node_that_completes_a_ref_is_offered_at_once_though_its_holders_were_cached(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """FindPeers keeps a ref's holders HOLDERS_CACHE_S; the heartbeat that makes a node a holder drops
    that answer on the replica that writes it. Else the next node of its site, pulling a moment later,
    was sent past it to the origin (seen in CI: a plaintext fleet's second node fetched every block over
    the WAN)."""

    async def body(registry: SharedRegistry) -> None:
        await registry.register_node("first", "A", "127.0.0.1:7401")
        await registry.register_node("second", "A", "127.0.0.1:7402")
        assert await registry.find_holders("first", REF, 64) == []  # while first pulls: cached
        await registry.record_heartbeat("first", {REF}, 0, None)  # first holds it
        await registry.flush()
        found = await registry.find_holders("second", REF, 64)
        assert [(node.node_id, same_site) for node, same_site in found] == [("first", True)]

    with_shared_registry(tmp_path, postgres_dsn, body)


def _find_peers(fleet: Fleet, address: str, requester: str) -> list[str]:
    with fleet.channel(address) as ch:
        version = version_pb2.Ref(layer=LAYER, number=1)
        reply = fleet_pb2_grpc.FleetStub(ch).FindPeers(
            fleet_pb2.FindPeersRequest(requester_id=requester, version=version), timeout=30
        )
    return [peer.node.node_id for peer in reply.peers]


def _last_seen_ns(fleet: Fleet, address: str) -> dict[str, int]:
    with fleet.channel(address) as ch:
        reply = fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=30)
    return {n.node.node_id: n.last_seen_ns for n in reply.nodes if n.healthy}


def _dashboard_nodes(http: str) -> set[str]:
    with urllib.request.urlopen(f"http://{http}/v1/dashboard", timeout=30) as response:
        snapshot = json.load(response)
    return {node["node_id"] for site in snapshot["sites"] for node in site["nodes"]}


def test_nodes_registered_through_different_replicas_are_found_listed_and_kept_by_every_replica(
    tmp_path: Path, postgres_dsn: str
) -> None:
    blocks = tmp_path / "blocks"
    with Fleet(tmp_path) as fleet:
        first, second = start_replicas(fleet, postgres_dsn, blocks, 2, ["--http", "127.0.0.1:0"])
        both = f"{first.address},{second.address}"
        # n1 registers and heartbeats through the first replica (the second only should it fail),
        # n2 through the second.
        holder = fleet.cachepoint("n1", both)
        fleet.cachepoint("n2", f"{second.address},{first.address}", subscribe=())
        image = tmp_path / "image"
        random_image(image, 2 * BLOCK, seed=5)
        publish(tmp_path / "admin", first.address, image, "production")
        fleet.wait_holds(holder, 1)

        # The second replica offers n1, which it never heard from, as a holder.
        wait_until(
            "the second replica to offer n1 as a holder",
            lambda: _find_peers(fleet, second.address, "n2") == ["n1"],
            30,
            logs=fleet.logs,
        )
        for replica in (first, second):
            listed = wait_until(
                f"{replica.name} to list both nodes",
                lambda r=replica: (lambda nodes: nodes if {"n1", "n2"} <= nodes.keys() else None)(
                    fleet_nodes(r.address)
                ),
                30,
                logs=fleet.logs,
            )
            assert listed["n1"]["healthy"] and REF in listed["n1"]["versions"], listed
            assert _dashboard_nodes(str(replica.ready["http"])) == {"n1", "n2"}

        first.kill()  # n1's replica: it heartbeats through the second now
        killed = time.time_ns()
        wait_until(
            "n1 to heartbeat through the second replica",
            lambda: _last_seen_ns(fleet, second.address).get("n1", 0) > killed,
            30,
            logs=fleet.logs,
        )
        time.sleep(STALE_AFTER_NS / 1e9)  # longer than a node may go unheard
        nodes = fleet_nodes(second.address)
        assert nodes["n1"]["healthy"] and nodes["n2"]["healthy"], nodes
        assert REF in nodes["n1"]["versions"], nodes
        assert _find_peers(fleet, second.address, "n2") == ["n1"]
