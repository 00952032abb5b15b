"""Giving deleted blocks' space back to the file system, only when there is room to do it.

Deleting a block writes a tombstone; its bytes leave the disk only when a compaction rewrites the
files that hold them. A compaction writes its output before it deletes its input, so it needs free
space for every live block it rewrites. Keys are random digests, so every level-0 file spans the
whole key space and any compaction that touches level 0 takes all of level 0 and the whole level
below: it cannot be cut into bounded key ranges. What it needs is therefore estimated as the live
block bytes (counted by the GC's own scan) plus what the memtables will flush, plus a margin.

When that much is not free, the compaction is skipped and the result says so. It must not be tried
"to see": measured with rocksdict 0.3.29, a compaction that runs out of space only raises the
database-wide ``rocksdb.background-errors`` count (``compact_range`` returns normally), and from then
on manual compactions do nothing, even once space is back, until the database is reopened. The
tombstones stay, so the next GC with room (even one that deletes nothing) compacts and gives the
space back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachepoint.store import format as fmt
from cachepoint.store.space import file_system, unflushed_bytes
from cachepoint.store.store import Store

MARGIN_SHARE = 50  # index and filter blocks, new OPTIONS/MANIFEST/LOG: 2% of the output...
MARGIN_MIN = 128 << 10  # ...and at least this much
MiB = 1 << 20
_DELETIONS_RE = re.compile(r"# deletions=(\d+)")


@dataclass(frozen=True, slots=True)
class Compaction:
    ran: bool
    needed_bytes: int  # estimated free space the compaction needs
    free_bytes: int  # free when it was decided
    reason: str  # why it did not run, or "" when it ran

    def as_json(self) -> dict[str, object]:
        return {
            "ran": self.ran,
            "needed_bytes": self.needed_bytes,
            "free_bytes": self.free_bytes,
            "reason": self.reason or None,
        }


def pending_deletions(store: Store) -> int:
    """Tombstones in the blocks family not yet compacted away (SST files and memtables)."""
    cf = store.db.cf[fmt.CF_BLOCKS]
    count = int(cf.property_int_value("rocksdb.num-deletes-active-mem-table") or 0)
    count += int(cf.property_int_value("rocksdb.num-deletes-imm-mem-tables") or 0)
    props = cf.property_value("rocksdb.aggregated-table-properties") or ""
    match = _DELETIONS_RE.search(props)
    return count + (int(match.group(1)) if match else 0)


def background_errors(store: Store) -> int:
    # A database-wide count: asked of a column family, RocksDB answers 0 whatever happened.
    return int(store.db.db.property_int_value("rocksdb.background-errors") or 0)


def compact_blocks(store: Store, live_bytes: int) -> Compaction | None:
    """Compact the blocks family when it holds tombstones and the disk has room for the rewrite;
    None when there is nothing to compact."""
    if not pending_deletions(store):
        return None
    cf = store.db.cf[fmt.CF_BLOCKS]
    output = live_bytes + unflushed_bytes(store)  # compact_range flushes the memtables first
    needed = output + max(output // MARGIN_SHARE, MARGIN_MIN)
    _, free = file_system(store.root)
    if free < needed:
        return Compaction(
            False,
            needed,
            free,
            f"compacting needs about {needed / MiB:.1f} MiB free and {free / MiB:.1f} MiB are: the "
            f"deleted blocks' space comes back at the next gc with room",
        )
    errors = background_errors(store)
    cf.compact_range(None, None)
    if background_errors(store) > errors:
        return Compaction(
            False,
            needed,
            free,
            "the compaction failed (RocksDB recorded a background error, e.g. out of space): it compacts "
            "again once the store is reopened",
        )
    return Compaction(True, needed, free, "")


# -- a command's own compactions -------------------------------------------------------------------

SETTLE_LIMIT = 900.0  # seconds a command waits for the compactions its writes started
IDLE_LIMIT = 5.0  # a compaction pending this long with none running will not run (e.g. no space)
POLL_SECONDS = 0.05


def finish_compactions(
    store: Store, notice: Callable[[str], None] | None = None, limit: float = SETTLE_LIMIT
) -> float:
    """Wait until no compaction runs or is pending in the blocks family; the seconds waited.

    For a process that opens the store for one command (no daemon). RocksDB stops a running
    compaction when the database closes and throws its output away; one that a command's writes
    started (an ingest that filled level 0) was then started again by every later command, which
    paid for it in CPU, disk writes and a wait at close, and abandoned it again: measured on a
    50,000-file capture store, 1.9 s of every 4.3 s re-capture. ``notice`` is told once, when there is
    something to wait for."""
    db, cf = store.db.db, store.db.cf[fmt.CF_BLOCKS]
    started = time.monotonic()
    idle_since: float | None = None
    told = False
    while time.monotonic() - started < limit:
        running = int(db.property_int_value("rocksdb.num-running-compactions") or 0)
        pending = int(cf.property_int_value("rocksdb.compaction-pending") or 0)
        if not running and not pending:
            break
        if background_errors(store):
            break  # out of space or damage: it will not finish now (compact_blocks explains)
        now = time.monotonic()
        if running:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since > IDLE_LIMIT:
            break
        if notice is not None and not told:
            level0 = int(cf.property_int_value("rocksdb.num-files-at-level0") or 0)
            notice(f"compacting the store ({level0} new files of blocks) before exiting")
            told = True
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started
