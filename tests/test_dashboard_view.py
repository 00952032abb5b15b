"""The dashboard's snapshot (coordinator/dashboard/view.py) over a real store, registry, holds and
audit log: nodes grouped by site, each online, lagging or offline; per-site and fleet totals of site
and WAN bytes and outboxes; a layer's newest versions with how many nodes hold each, its tags and
promotions newest first; the holds and the audit head."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import LayerKind
from cachepoint.rpc.block_exchange import ServeCounters
from coordinator.dashboard.view import VERSIONS_SHOWN, Dashboard
from coordinator.fleet.registry import STALE_AFTER_NS, NodeReport, Registry, SubscriptionLag
from coordinator.history.audit import AuditLog
from coordinator.history.holds import Holds
from tests.fleet import open_coordinator_store

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

LAYER = "os/x"


def report(wanted: int, held: int, site: int, wan: int, outbox: int = 0) -> NodeReport:
    return NodeReport(
        software="0.1.0",
        outbox_depth=outbox,
        bytes_by_source=(("site", 1, site), ("peer", 1, wan // 2), ("origin", 1, wan - wan // 2)),
        subscriptions=(SubscriptionLag(f"{LAYER}:production", wanted, held, "current"),),
    )


def test_the_snapshot_shows_each_site_its_nodes_states_and_traffic_and_each_layers_newest_versions(
    tmp_path: Path,
) -> None:
    source = tmp_path / "image"
    with open_coordinator_store(tmp_path / "store") as store:
        for number in range(1, VERSIONS_SHOWN + 3):
            source.write_bytes(b"version %d\n" % number * 1000)
            ingest(store, source, IngestOptions(LAYER, LayerKind.OS, message=f"build {number}", workers=1))
        store.catalog.set_tag(f"{LAYER}@3", "production", "publisher")
        store.catalog.set_tag(f"{LAYER}@9", "production", "publisher")
        audit = AuditLog(store.db)
        holds = Holds(store.db, audit)
        holds.set("alice", "litigation 2026-114", "audrey")

        registry = Registry()
        for node_id, site in [("n1", "hq"), ("n2", "hq"), ("n3", "branch")]:
            registry.register(node_id, site, f"127.0.0.1:{7400 + int(node_id[1])}")
        registry.heartbeat("n1", {f"{LAYER}@9", f"{LAYER}@10"}, 0, report(9, 9, site=0, wan=4000))
        registry.heartbeat("n2", {f"{LAYER}@7"}, 0, report(9, 7, site=3000, wan=0, outbox=2))
        registry.heartbeat("n3", {f"{LAYER}@9"}, 0, report(9, 9, site=0, wan=1000, outbox=1))
        registry.heartbeat("n1", {f"{LAYER}@9", f"{LAYER}@10"}, 0)  # a heartbeat without a report keeps it
        registry.nodes["n3"].last_seen_ns = time.time_ns() - STALE_AFTER_NS - 1

        dashboard = Dashboard(registry, store, holds, audit, ServeCounters(), time.time_ns())
        snapshot = asyncio.run(dashboard.snapshot())

    sites = {site["site"]: site for site in snapshot["sites"]}
    assert list(sites) == ["branch", "hq"]
    states = {n["node_id"]: n["state"] for site in snapshot["sites"] for n in site["nodes"]}
    assert states == {"n1": "online", "n2": "lagging", "n3": "offline"}
    n2 = sites["hq"]["nodes"][1]
    assert (n2["lag"], n2["outbox_depth"], n2["site_bytes"], n2["wan_bytes"]) == (2, 2, 3000, 0), n2
    hq = sites["hq"]
    assert (hq["site_bytes"], hq["wan_bytes"], hq["outbox_depth"], hq["online"]) == (3000, 4000, 2, 2)
    assert sites["hq"]["nodes"][0]["held"] == [f"{LAYER}@9", f"{LAYER}@10"]  # by number, not as text
    totals = snapshot["totals"]
    assert (totals["nodes"], totals["online"], totals["lagging"], totals["offline"]) == (3, 1, 1, 1)
    assert (totals["site_bytes"], totals["wan_bytes"], totals["outbox_depth"]) == (3000, 5000, 3)
    assert (totals["layers"], totals["versions_made"], totals["holds"]) == (1, VERSIONS_SHOWN + 2, 1)

    (layer,) = snapshot["layers"]
    numbers = [v["number"] for v in layer["versions"]]
    assert numbers == list(range(VERSIONS_SHOWN + 2, 2, -1))  # the newest VERSIONS_SHOWN, newest first
    holders = {v["number"]: v["holders"] for v in layer["versions"]}
    assert (holders[10], holders[9], holders[7], holders[8]) == (1, 2, 1, 0)
    assert layer["tags"] == {"latest": 10, "production": 9}
    production = [(m["version"], m["previous"]) for m in layer["promotions"] if m["tag"] == "production"]
    assert production == [(9, 3), (3, None)]
    assert [h["user"] for h in snapshot["holds"]] == ["alice"]
    assert snapshot["audit"]["seq"] >= 1
    assert snapshot["audit"]["recent"][0]["action"] == "hold.set"
