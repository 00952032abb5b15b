"""The daemon's metrics (``cachepoint_`` prefix). README.md's "Metrics" table lists every series.

Two kinds: series updated where things happen (fetches, pulls, NBD requests, GC, scrub, gRPC calls),
and series read from the daemon's state when scraped (``collect``: served blocks, subscriptions,
the decoded-block cache, the outbox, the store). The latter cost nothing between scrapes; what they
read from the store (the outbox scan, the database's size) is read on a worker thread by ``refresh``
before each collection, so a scrape never holds the event loop on disk I/O.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachepoint.metrics.exposition import Exposition, layer_label
from cachepoint.metrics.nbd import NbdMetrics
from cachepoint.replication import outbox
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.rpc.metrics import RpcMetrics
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

if TYPE_CHECKING:
    from cachepoint.daemon import Daemon
    from cachepoint.scrub import ScrubResult
    from cachepoint.store.gc import GcResult

PREFIX = "cachepoint"
# Seconds: a pull of a few changed blocks takes a second, a whole OS image over a WAN an hour.
PULL_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


@dataclass(frozen=True, slots=True)
class StoreReadings:
    """What a scrape reads from the store, on a worker thread."""

    disk_bytes: int
    blocks: int
    versions: int
    outbox_depth: int  # 0 without ``outbox`` (a coordinator has none)


def read_store(store: Store, outbox_depth: bool = True) -> StoreReadings:
    disk = 0
    for root, _, files in os.walk(store.db.path):
        for name in files:
            try:
                disk += os.stat(os.path.join(root, name)).st_size
            except OSError:  # a file RocksDB removed meanwhile (compaction)
                pass
    try:
        blocks = int(store.db.cf[fmt.CF_BLOCKS].property_int_value("rocksdb.estimate-num-keys") or 0)
    except Exception:  # a property RocksDB cannot give now: not worth failing the scrape for
        blocks = 0
    depth = outbox.depth(store) if outbox_depth else 0
    return StoreReadings(disk, blocks, len(store.catalog.all_versions()), depth)


class NodeMetrics(Exposition):
    """Every series of one daemon, in its own registry."""

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self.rpc = RpcMetrics(registry, PREFIX)
        self.nbd = NbdMetrics(self)
        labels = ["source_class", "site"]
        self.fetched_bytes = Counter(
            f"{PREFIX}_fetched_bytes",
            "Stored (compressed) bytes of verified blocks fetched, by class and site of the source "
            "(site: the peer's; empty for the coordinator).",
            labels,
            registry=registry,
        )
        self.fetched_blocks = Counter(
            f"{PREFIX}_fetched_blocks",
            "Verified blocks fetched, by class and site of the source.",
            labels,
            registry=registry,
        )
        self.fetch_failures = Counter(
            f"{PREFIX}_fetch_failures",
            "Failed fetches from a source (unreachable, refused, corrupt blocks), by class and site.",
            labels,
            registry=registry,
        )
        self.pull_duration = Histogram(
            f"{PREFIX}_pull_duration_seconds",
            "Time a pull took, by outcome (fetched, already_local, failed).",
            ["outcome"],
            buckets=PULL_BUCKETS,
            registry=registry,
        )
        self.gc_runs = Counter(f"{PREFIX}_gc_runs", "Garbage collections of the store.", registry=registry)
        self.gc_removed_blocks = Counter(
            f"{PREFIX}_gc_removed_blocks", "Blocks garbage collection removed.", registry=registry
        )
        self.gc_freed_bytes = Counter(
            f"{PREFIX}_gc_freed_bytes", "Stored bytes garbage collection removed.", registry=registry
        )
        self.scrub_runs = Counter(
            f"{PREFIX}_scrub_runs",
            "Scrub passes that ended, by outcome (ok; damaged: blocks still bad; incomplete).",
            ["outcome"],
            registry=registry,
        )
        self.scrub_checked_blocks = Counter(
            f"{PREFIX}_scrub_checked_blocks",
            "Blocks read and verified by finished scrub passes.",
            registry=registry,
        )
        self.scrub_checked_bytes = Counter(
            f"{PREFIX}_scrub_checked_bytes", "Stored bytes read by finished scrub passes.", registry=registry
        )
        self.scrub_bad_blocks = Counter(
            f"{PREFIX}_scrub_bad_blocks", "Corrupt or unreadable blocks scrubs found.", registry=registry
        )
        self.scrub_healed_blocks = Counter(
            f"{PREFIX}_scrub_healed_blocks",
            "Bad blocks scrubs fetched again from the fleet.",
            registry=registry,
        )
        self.scrub_last_completion = Gauge(
            f"{PREFIX}_scrub_last_completion_timestamp_seconds",
            "When the last complete scrub pass finished (Unix time; 0: none since the daemon started).",
            registry=registry,
        )
        for outcome in ("ok", "damaged", "incomplete"):
            self.scrub_runs.labels(outcome)
        for outcome in ("fetched", "already_local", "failed"):
            self.pull_duration.labels(outcome)
        self._daemon: Daemon | None = None
        self._store: StoreReadings | None = None
        registry.register(_StateCollector(self))

    def attach(self, daemon: Daemon) -> None:
        """The daemon whose state scrapes read."""
        self._daemon = daemon

    async def refresh(self) -> None:
        daemon = self._daemon
        if daemon is not None and daemon.store is not None:
            self._store = await asyncio.to_thread(read_store, daemon.store)

    # -- updated where things happen ---------------------------------------------------------------

    def fetched(self, source: Source) -> None:
        site = source.site if source.source_class != SourceClass.ORIGIN else ""
        labels = (str(source.source_class), site)
        if source.counters.bytes:
            self.fetched_bytes.labels(*labels).inc(source.counters.bytes)
        if source.counters.blocks:
            self.fetched_blocks.labels(*labels).inc(source.counters.blocks)
        if source.counters.failures:
            self.fetch_failures.labels(*labels).inc(source.counters.failures)

    def pulled(self, outcome: str, seconds: float) -> None:
        self.pull_duration.labels(outcome).observe(seconds)

    def collected(self, result: GcResult) -> None:
        self.gc_runs.inc()
        self.gc_removed_blocks.inc(result.blocks_removed)
        self.gc_freed_bytes.inc(result.bytes_freed)

    def scrubbed(self, result: ScrubResult) -> None:
        outcome = "incomplete" if not result.complete else ("ok" if result.ok else "damaged")
        self.scrub_runs.labels(outcome).inc()
        if not result.complete:
            return  # its blocks are counted when the pass that goes on with it finishes
        self.scrub_checked_blocks.inc(result.blocks_checked)
        self.scrub_checked_bytes.inc(result.bytes_checked)
        self.scrub_bad_blocks.inc(len(result.bad))
        self.scrub_healed_blocks.inc(len(result.healed))
        self.scrub_last_completion.set(result.finished_ns / 1e9 if result.finished_ns else time.time())


class _StateCollector(Collector):
    """The series read from the daemon's state at each scrape."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the names vary with what is attached: nothing to check them against

    def collect(self) -> Iterator[Metric]:
        daemon = self.metrics._daemon
        if daemon is None:
            return
        served = daemon.serve_counters
        yield _counter("served_blocks", "Blocks sent to peers from this node's store.", served.blocks_served)
        yield _counter(
            "served_bytes", "Stored bytes sent to peers from this node's store.", served.bytes_served
        )
        yield _gauge(
            "coordinator_connected", "1 while the last heartbeat reached the coordinator.", daemon.connected
        )
        yield _gauge(
            "catalog_position", "The last catalog event position this node has seen.", daemon.catalog_position
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_subscription_lag_versions",
            "Versions a subscription is behind what its ref names at the coordinator (user layers: user/*).",
            labels=["subscription"],
        )
        lags: dict[str, int] = {}
        states: dict[str, int] = {}
        for sub in list(daemon.subscriptions):
            label = layer_label(str(sub.ref))
            lags[label] = max(lags.get(label, 0), max(sub.wanted - sub.held, 0))
            states[sub.state] = states.get(sub.state, 0) + 1
        for label, behind in sorted(lags.items()):
            lag.add_metric([label], behind)
        yield lag
        by_state = GaugeMetricFamily(
            f"{PREFIX}_subscriptions",
            "Subscriptions by state (current, pulling, waiting...).",
            labels=["state"],
        )
        for state, count in sorted(states.items()):
            by_state.add_metric([state], count)
        yield by_state
        disks = getattr(daemon, "disks", None)
        cache = disks.decoded if disks is not None else None
        hits = cache.hits if cache is not None else 0
        misses = cache.misses if cache is not None else 0
        yield _counter("read_cache_hits", "Block reads the decoded-block cache answered.", hits)
        yield _counter("read_cache_misses", "Block reads the decoded-block cache could not answer.", misses)
        yield _gauge(
            "read_cache_hit_ratio",
            "Hits over all reads of the decoded-block cache since the daemon started (0 before any).",
            hits / (hits + misses) if hits + misses else 0.0,
        )
        recoder = disks.recoder if disks is not None else None
        yield _counter(
            "recoded_blocks",
            "Blocks re-stored in lz4: disks or the HTTP reader decoded them from zstd again (hot_codec).",
            recoder.recoded if recoder is not None else 0,
        )
        yield _counter(
            "recoded_stored_bytes_before",
            "Stored bytes of the re-stored blocks while they were in zstd.",
            recoder.bytes_before if recoder is not None else 0,
        )
        yield _counter(
            "recoded_stored_bytes_after",
            "Stored bytes of the re-stored blocks in lz4 (after minus before: the disk space it took).",
            recoder.bytes_after if recoder is not None else 0,
        )
        yield _gauge(
            "attached_disks", "Disks attached for NBD now.", len(disks.attached) if disks is not None else 0
        )
        store = self.metrics._store
        if store is not None:
            yield _gauge(
                "outbox_versions",
                "Local user versions waiting to be sent to the coordinator.",
                store.outbox_depth,
            )
            yield _gauge("store_disk_bytes", "Bytes of the store's database files on disk.", store.disk_bytes)
            yield _gauge("store_blocks", "Blocks in the store (RocksDB's estimate).", store.blocks)
            yield _gauge("store_versions", "Versions the store holds.", store.versions)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)
