"""Who is in the fleet, where, how busy, which versions each holds complete, and which it is pulling.

Kept in memory by the embedded coordinator: nodes register again when a heartbeat is refused (after a
coordinator restart), so the registry rebuilds itself within one heartbeat interval and is never a
second source of truth. Replicas over PostgreSQL share one registry instead
(coordinator/fleet/shared.py); the services read and write either through the async methods of
``FleetRegistry``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

HEARTBEAT_INTERVAL_MS = 2000
STALE_AFTER_NS = 3 * HEARTBEAT_INTERVAL_MS * 1_000_000  # three missed heartbeats: not offered as a peer
# A pull announced by FindPeers(pulling) is forgotten this long after its last announcement, should the
# node never report the version complete (its pull failed, it was given another version to follow).
PULLING_TTL_NS = 600 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class SubscriptionLag:
    ref: str
    wanted: int
    held: int
    state: str

    @property
    def lag(self) -> int:
        """Versions the node is behind the one its ref names (0 when it holds it, or follows none)."""
        return max(self.wanted - self.held, 0) if self.wanted else 0


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node's heartbeat says of how it is doing (coordinator/dashboard shows it). Counters are
    since the node started."""

    software: str = ""
    outbox_depth: int = 0
    bytes_by_source: tuple[tuple[str, int, int], ...] = ()  # (source class, blocks, bytes)
    subscriptions: tuple[SubscriptionLag, ...] = ()


@dataclass
class Node:
    node_id: str
    site: str
    address: str
    registered_ns: int
    last_seen_ns: int
    load: int = 0
    complete: set[str] = field(default_factory=set)  # refs "layer@N"
    pulling: dict[str, int] = field(default_factory=dict)  # ref "layer@N" -> when last announced (ns)
    report: NodeReport = field(default_factory=NodeReport)

    def healthy(self, now_ns: int) -> bool:
        return now_ns - self.last_seen_ns < STALE_AFTER_NS


class UnknownNode(Exception):
    pass


class FleetRegistry(Protocol):
    """What the fleet service, the dashboard and the metrics use of a registry (in memory, or shared
    by the replicas in PostgreSQL)."""

    async def register_node(self, node_id: str, site: str, address: str) -> None: ...

    async def record_heartbeat(
        self, node_id: str, complete: set[str], load: int, report: NodeReport | None
    ) -> None: ...

    async def record_pulling(self, node_id: str, ref: str) -> None: ...

    async def find_pullers(self, requester_id: str, ref: str) -> list[Node]: ...

    async def find_holders(
        self, requester_id: str, ref: str | None, limit: int
    ) -> list[tuple[Node, bool]]: ...

    async def list_nodes(self) -> list[Node]: ...

    async def count_by_state(self) -> Counter[tuple[str, str]]: ...

    async def forget_silent(self, before_ns: int) -> list[str]: ...


def count_by_state(nodes: list[Node], now_ns: int) -> Counter[tuple[str, str]]:
    """Nodes by (site, "healthy" | "stale")."""
    return Counter((node.site, "healthy" if node.healthy(now_ns) else "stale") for node in nodes)


class Registry:
    """The embedded coordinator's registry, in this process's memory (changed on the event loop)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def register(self, node_id: str, site: str, address: str) -> Node:
        now = time.time_ns()
        node = Node(node_id, site, address, now, now)
        previous = self.nodes.get(node_id)
        if previous is not None:
            node.complete = previous.complete
            node.pulling = previous.pulling
            node.report = previous.report
        self.nodes[node_id] = node
        return node

    def heartbeat(
        self, node_id: str, complete: set[str], load: int, report: NodeReport | None = None
    ) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        node.last_seen_ns = time.time_ns()
        node.complete = complete
        node.load = load
        if report is not None:
            node.report = report
        for ref in complete & node.pulling.keys():
            del node.pulling[ref]
        return node

    def pulling(self, node_id: str, ref: str) -> None:
        """``node_id`` is pulling ``ref`` now (a partial holder of it for its site peers)."""
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        node.pulling[ref] = time.time_ns()

    def pullers(self, requester_id: str, ref: str) -> list[Node]:
        """Healthy nodes of the requester's site pulling ``ref`` now (not complete yet), requester
        excluded, by node id: the candidates of the site's rendezvous for ``ref``'s blocks."""
        now = time.time_ns()
        requester = self.nodes.get(requester_id)
        if requester is None:
            return []
        found = [
            node
            for node in self.nodes.values()
            if node.node_id != requester_id
            and node.site == requester.site
            and node.healthy(now)
            and ref not in node.complete
            and now - node.pulling.get(ref, -PULLING_TTL_NS) < PULLING_TTL_NS
        ]
        return sorted(found, key=lambda n: n.node_id)

    def holders(self, requester_id: str, ref: str | None, limit: int) -> list[tuple[Node, bool]]:
        """Healthy nodes holding ``ref`` complete (all healthy nodes when ref is None), requester
        excluded: same site first, then least loaded. Returns (node, same_site)."""
        now = time.time_ns()
        requester = self.nodes.get(requester_id)
        site = requester.site if requester else None
        found = [
            node
            for node in self.nodes.values()
            if node.node_id != requester_id and node.healthy(now) and (ref is None or ref in node.complete)
        ]
        found.sort(key=lambda n: (n.site != site, n.load, n.node_id))
        return [(node, node.site == site) for node in found[: limit or None]]

    # -- FleetRegistry: the same, as the services call it ---------------------------------------

    async def register_node(self, node_id: str, site: str, address: str) -> None:
        self.register(node_id, site, address)

    async def record_heartbeat(
        self, node_id: str, complete: set[str], load: int, report: NodeReport | None
    ) -> None:
        self.heartbeat(node_id, complete, load, report)

    async def record_pulling(self, node_id: str, ref: str) -> None:
        self.pulling(node_id, ref)

    async def find_pullers(self, requester_id: str, ref: str) -> list[Node]:
        return self.pullers(requester_id, ref)

    async def find_holders(self, requester_id: str, ref: str | None, limit: int) -> list[tuple[Node, bool]]:
        return self.holders(requester_id, ref, limit)

    async def list_nodes(self) -> list[Node]:
        return list(self.nodes.values())

    async def count_by_state(self) -> Counter[tuple[str, str]]:
        return count_by_state(list(self.nodes.values()), time.time_ns())

    async def forget_silent(self, before_ns: int) -> list[str]:
        """Forget the nodes last heard from before ``before_ns``; returns their ids."""
        gone = [node_id for node_id, node in self.nodes.items() if node.last_seen_ns < before_ns]
        for node_id in gone:
            del self.nodes[node_id]
        return gone
