"""What the dashboard shows, as one JSON snapshot: the fleet by site (from the registry: in memory, or
shared by the replicas in PostgreSQL), the catalog's layers, versions, tags and promotions, the legal
holds and the audit head (from the store).

The registry is read on the event loop (it is changed there, by heartbeats, or read from PostgreSQL
asynchronously); the store on a worker thread. Everything listed is bounded (MAX_LAYERS,
VERSIONS_SHOWN, ...) so a fleet with thousands of user layers still answers in one small reply; the
totals count everything.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cachepoint import __version__
from cachepoint.errors import NotFound
from cachepoint.rpc.block_exchange import ServeCounters
from cachepoint.store.store import Store
from coordinator.fleet.registry import FleetRegistry, Node
from coordinator.history.audit import AuditLog
from coordinator.history.holds import Holds

MAX_LAYERS = 200  # layers listed (os/ and app/ first); the totals count all
VERSIONS_SHOWN = 8  # newest versions listed per layer
PROMOTIONS_SHOWN = 10  # newest tag moves listed per layer
AUDIT_SHOWN = 5  # newest audit records listed under the head
WAN_CLASSES = ("peer", "origin")  # bytes that crossed between sites (cachepoint/replication/sources.py)
SITE_CLASS = "site"


@dataclass(frozen=True)
class Dashboard:
    """Where the snapshot is read from: the coordinator's own objects, shared, never copied."""

    registry: FleetRegistry
    store: Store
    holds: Holds
    audit: AuditLog
    served: ServeCounters
    started_ns: int

    async def snapshot(self) -> dict[str, Any]:
        now = time.time_ns()
        registered = await self.registry.list_nodes()
        nodes = [node_json(node, now) for node in registered]
        holders = Counter(ref for node in registered for ref in node.complete)
        stored = await asyncio.to_thread(self._stored, holders)
        return assemble(nodes, stored, self._coordinator(now), now)

    def _coordinator(self, now: int) -> dict[str, Any]:
        return {
            "software": __version__,
            "uptime_s": (now - self.started_ns) / 1e9,
            "served_blocks": self.served.blocks_served,
            "served_bytes": self.served.bytes_served,
        }

    def _stored(self, holders: Counter[str]) -> dict[str, Any]:
        catalog = self.store.catalog
        records = sorted(catalog.layers(), key=lambda r: (r.name.startswith("user/"), r.name))
        layers = [layer_json(self.store, record, holders) for record in records[:MAX_LAYERS]]
        seq, head_hash = self.audit.head()
        recent = self.audit.records(after=max(seq - AUDIT_SHOWN, 0), limit=AUDIT_SHOWN) if seq else []
        return {
            "layers": layers,
            "layers_total": len(records),
            "versions_made": sum(record.latest for record in records),  # GC may have deleted some
            "holds": [hold.as_json() for hold in self.holds.all()],
            "audit": {
                "seq": seq,
                "hash": head_hash,
                "recent": [
                    {k: r.as_json()[k] for k in ("seq", "time_ns", "actor", "action", "subject")}
                    for r in reversed(recent)
                ],
            },
        }


def node_json(node: Node, now_ns: int) -> dict[str, Any]:
    report = node.report
    by_class = {name: {"blocks": blocks, "bytes": size} for name, blocks, size in report.bytes_by_source}
    lag = sum(sub.lag for sub in report.subscriptions)
    healthy = node.healthy(now_ns)
    return {
        "node_id": node.node_id,
        "site": node.site,
        "address": node.address,
        "last_seen_s": max(now_ns - node.last_seen_ns, 0) / 1e9,
        "healthy": healthy,
        "state": "offline" if not healthy else "lagging" if lag else "online",
        "load": node.load,
        "software": report.software,
        "held": sorted(node.complete, key=_ref_order),
        "pulling": sorted(node.pulling, key=_ref_order),
        "lag": lag,
        "subscriptions": [
            {"ref": s.ref, "wanted": s.wanted, "held": s.held, "lag": s.lag, "state": s.state}
            for s in report.subscriptions
        ],
        "outbox_depth": report.outbox_depth,
        "bytes_by_source": by_class,
        "wan_bytes": sum(by_class.get(name, {}).get("bytes", 0) for name in WAN_CLASSES),
        "site_bytes": by_class.get(SITE_CLASS, {}).get("bytes", 0),
    }


def _ref_order(ref: str) -> tuple[str, int]:
    layer, _, number = ref.rpartition("@")
    return layer, int(number) if number.isdigit() else 0


def layer_json(store: Store, record: Any, holders: Counter[str]) -> dict[str, Any]:
    catalog = store.catalog
    versions = []
    # Newest first, by number: versions the history GC deleted leave gaps, skipped.
    number = record.latest
    while number >= 1 and len(versions) < VERSIONS_SHOWN:
        try:
            info = catalog.version(record.name, number)
        except NotFound:
            number -= 1
            continue
        versions.append(
            {
                "number": info.number,
                "created_ns": info.created_ns,
                "author": info.author,
                "message": info.message,
                "logical_bytes": info.logical_bytes,
                "holders": holders.get(info.ref, 0),
            }
        )
        number -= 1
    promotions = catalog.tag_history(record.name)[-PROMOTIONS_SHOWN:]
    return {
        "name": record.name,
        "kind": str(record.kind),
        "latest": record.latest,
        "created_ns": record.created_ns,
        "tags": dict(sorted(catalog.tags(record.name).items())),
        "versions": versions,
        "promotions": list(reversed(promotions)),
    }


def assemble(
    nodes: list[dict[str, Any]], stored: dict[str, Any], coordinator: dict[str, Any], now_ns: int
) -> dict[str, Any]:
    """The snapshot: nodes grouped by site (sites and nodes by name), with per-site and fleet totals."""
    sites: dict[str, list[dict[str, Any]]] = {}
    for node in sorted(nodes, key=lambda n: (n["site"], n["node_id"])):
        sites.setdefault(node["site"], []).append(node)
    site_rows = [
        {
            "site": site,
            "nodes": members,
            "online": sum(1 for n in members if n["healthy"]),
            "wan_bytes": sum(n["wan_bytes"] for n in members),
            "site_bytes": sum(n["site_bytes"] for n in members),
            "outbox_depth": sum(n["outbox_depth"] for n in members),
        }
        for site, members in sites.items()
    ]
    states = Counter(n["state"] for n in nodes)
    return {
        "generated_ns": now_ns,
        "coordinator": coordinator,
        "totals": {
            "nodes": len(nodes),
            "online": states["online"],
            "lagging": states["lagging"],
            "offline": states["offline"],
            "sites": len(site_rows),
            "layers": stored["layers_total"],
            "versions_made": stored["versions_made"],
            "outbox_depth": sum(n["outbox_depth"] for n in nodes),
            "wan_bytes": sum(n["wan_bytes"] for n in nodes),
            "site_bytes": sum(n["site_bytes"] for n in nodes),
            "holds": len(stored["holds"]),
            "audit_seq": stored["audit"]["seq"],
        },
        "sites": site_rows,
        **stored,
    }
