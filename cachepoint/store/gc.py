"""Mark-and-sweep garbage collection of blocks no version references.

Proof first: the mark is built from a census of the catalog (cachepoint/store/census.py), and GC
refuses (CatalogUnreadable, exit 8, naming what it could not read) unless that census is complete. A
read error must never look like "no version references this block".

Mark: every block of every version's manifest, plus the blocks pinned by ingests running in this
process. Sweep: candidates are re-checked against the pins and deleted under the store's lock, the
same lock an ingest takes to pin a block before it asks whether the block exists; so a block an
ingest relies on is either kept, or deleted before the ingest looks (and then written again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachepoint.store import census
from cachepoint.store import format as fmt
from cachepoint.store.compaction import Compaction, compact_blocks
from cachepoint.store.store import Store

SWEEP_BATCH = 1024


@dataclass(frozen=True, slots=True)
class GcResult:
    blocks_removed: int
    bytes_freed: int
    blocks_kept: int
    interrupted_ingests_cleared: int
    prefilter_records_removed: int
    compaction: Compaction | None = None  # None: no deleted blocks to compact

    def as_json(self) -> dict[str, object]:
        return {
            "blocks_removed": self.blocks_removed,
            "bytes_freed": self.bytes_freed,
            "blocks_kept": self.blocks_kept,
            "interrupted_ingests_cleared": self.interrupted_ingests_cleared,
            "prefilter_records_removed": self.prefilter_records_removed,
            "space_given_back": self.compaction is not None and self.compaction.ran,
            "compaction": self.compaction.as_json() if self.compaction else None,
        }


def referenced_blocks(store: Store, action: str = "gc") -> tuple[set[bytes], set[bytes]]:
    """(block ids, manifest digests) referenced by any version or by an attached disk's working map
    (a disk's writes since its last snapshot, kept whether or not the disk is attached now). Raises
    CatalogUnreadable unless every record they come from was read."""
    found = census.take(store)
    found.require_complete(action, store.root)
    blocks = found.referenced_blocks() | store.working_block_ids()
    return blocks, set(found.manifests)


def collect(store: Store, before_sweep: Callable[[], None] | None = None) -> GcResult:
    store.begin_gc()
    try:
        return _collect(store, before_sweep)
    finally:
        store.end_gc()


def _collect(store: Store, before_sweep: Callable[[], None] | None) -> GcResult:
    interrupted = store.interrupted_ingests()
    live, manifests = referenced_blocks(store)
    if before_sweep is not None:
        before_sweep()  # a test hook: lets a concurrent ingest run between mark and sweep
    removed = freed = kept = scanned_bytes = 0
    candidates: list[tuple[bytes, int]] = []
    # Blocks that know their write time (a coordinator's shared block directory) are swept only once
    # older than its grace period: another replica may have received them for a commit not made yet.
    grace = getattr(store.blocks, "grace_s", None)
    young_after = time.time() - grace if grace is not None else None

    def sweep() -> None:
        nonlocal removed, freed
        with store.lock:
            doomed = {d: size for d, size in candidates if not store.is_pinned(d)}
            gone = store.blocks.delete_many(doomed, older_than=young_after)
        # Only what went: a shared directory's block made young again since the scan (a replica was
        # asked for it), or removed by another replica's sweep, stays out of both counts.
        removed += len(gone)
        freed += sum(doomed[d] for d in gone)
        candidates.clear()

    for digest, size, written in store.blocks.scan_sizes():
        scanned_bytes += size
        if digest in live or (young_after is not None and written >= young_after):
            kept += 1
            continue
        candidates.append((digest, size))
        if len(candidates) >= SWEEP_BATCH:
            sweep()
    sweep()
    # Scan first, then re-read the versions: a commit writes its prefilter records and its version in
    # one batch, so every record seen here belongs to a version the re-read sees (even one committed
    # after the mark).
    prefilter_keys = list(store.db.scan_keys(fmt.CF_PREFILTER))
    manifests |= {info.manifest_digest for info in store.catalog.all_versions()}
    stale_prefilter = [key for key in prefilter_keys if key[: len(key) - 4] not in manifests]
    if stale_prefilter:
        batch = store.db.batch()
        for key in stale_prefilter:
            batch.delete(key, store.db.handle[fmt.CF_PREFILTER])
        store.db.write(batch, sync=True)
    if interrupted:
        store.forget_interrupted(interrupted)
    # Give the space back, only if the disk has room for the rewrite (a compaction that runs out of
    # space stops RocksDB compacting until the store is reopened).
    compaction = compact_blocks(store, live_bytes=scanned_bytes - freed) if store.blocks.in_database else None
    return GcResult(removed, freed, kept, len(interrupted), len(stale_prefilter), compaction)
