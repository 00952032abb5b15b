"""The coordinator's metrics (``cachepoint_coordinator_`` prefix), served at /metrics by the REST server
(coordinator/history/rest.py; README.md's "Metrics" table lists every series).

gRPC calls by method and code are counted by the interceptor every server has (cachepoint/rpc/
metrics.py); commits where they are accepted; the rest is read at each scrape: registered nodes by
site from the fleet registry and the store's size on a worker thread (both in ``refresh``), open Watch
streams from the interceptor, the catalog's event position from its log.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachepoint.metrics.exposition import Exposition
from cachepoint.metrics.node import StoreReadings, read_store
from cachepoint.model import VersionInfo
from cachepoint.rpc.block_exchange import ServeCounters
from cachepoint.rpc.metrics import RpcMetrics
from cachepoint.store.store import Store
from coordinator.catalog.events import EventLog
from coordinator.fleet.registry import FleetRegistry

PREFIX = "cachepoint_coordinator"
WATCH = "cachepoint.v1.Catalog/Watch"
ROOTS = ("os", "app", "user")


class CoordinatorMetrics(Exposition):
    def __init__(self, store: Store, events: EventLog, counters: ServeCounters) -> None:
        super().__init__()
        self.store = store
        self.events = events
        self.counters = counters
        self.registry_of_nodes: FleetRegistry | None = None
        self._nodes: Tally[tuple[str, str]] = Tally()
        self.rpc = RpcMetrics(self.registry, PREFIX)
        self.commits = Counter(
            f"{PREFIX}_commits",
            "Versions committed, by the root of their layer (os, app, user, other).",
            ["root"],
            registry=self.registry,
        )
        for root in (*ROOTS, "other"):
            self.commits.labels(root)
        self._store: StoreReadings | None = None
        self.registry.register(_StateCollector(self))

    def committed(self, info: VersionInfo) -> None:
        root = info.layer.partition("/")[0]
        self.commits.labels(root if root in ROOTS else "other").inc()

    def watch(self, nodes: FleetRegistry) -> None:
        """The fleet registry whose nodes scrapes count."""
        self.registry_of_nodes = nodes

    async def refresh(self) -> None:
        if self.registry_of_nodes is not None:
            self._nodes = await self.registry_of_nodes.count_by_state()
        self._store = await asyncio.to_thread(read_store, self.store, False)


class _StateCollector(Collector):
    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        nodes = GaugeMetricFamily(
            f"{PREFIX}_nodes",
            "Registered nodes by site and state (healthy: a heartbeat within the stale limit).",
            labels=["site", "state"],
        )
        for (site, state), count in sorted(m._nodes.items()):
            nodes.add_metric([site, state], count)
        yield nodes
        yield GaugeMetricFamily(
            f"{PREFIX}_watch_subscribers",
            "Open Watch streams (nodes following the catalog).",
            value=m.rpc.open.get(WATCH, 0),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_catalog_events",
            "Catalog events written (commits, tag moves, deletions), since the catalog began.",
            value=m.events.visible,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_served_blocks",
            "Blocks sent from the origin to nodes and clients.",
            value=m.counters.blocks_served,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_served_bytes", "Stored bytes sent from the origin.", value=m.counters.bytes_served
        )
        yield CounterMetricFamily(
            f"{PREFIX}_received_blocks",
            "Verified blocks pushed to the origin.",
            value=m.counters.blocks_received,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_rejected_blocks",
            "Pushed blocks refused (their bytes did not hash to their id).",
            value=m.counters.blocks_rejected,
        )
        if m._store is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_store_disk_bytes",
                "Bytes of the store's database files on disk.",
                value=m._store.disk_bytes,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_store_blocks", "Blocks in the store (RocksDB's estimate).", value=m._store.blocks
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_store_versions", "Versions in the catalog.", value=m._store.versions
            )
