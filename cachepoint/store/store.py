"""The store as a whole: its database, blocks, catalog, and the ingests running in this process."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cachepoint.store import format as fmt
from cachepoint.store.blockstore import BlockStore
from cachepoint.store.catalog import Catalog
from cachepoint.store.db import StoreDB
from cachepoint.store.units import UnitRecords


@dataclass
class IngestPins:
    """Blocks an ingest in progress relies on; GC in this process never removes them."""

    ingest_id: bytes
    layer: str
    digests: set[bytes] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class InterruptedIngest:
    ingest_id: bytes
    layer: str
    pid: int
    started_ns: int


class Store:
    """Open with ``Store.open(dir)`` for reading or ``Store.open(dir, writable=True)`` for writing.

    Only one process writes a store at a time (RocksDB's lock; a second writer gets StoreBusy).
    Inside that process, ``lock`` orders block pinning against GC's sweep.
    """

    def __init__(self, db: StoreDB, blocks: BlockStore | None = None) -> None:
        """``blocks``: where the blocks live when not in ``db`` (a coordinator's shared directory,
        coordinator/backends/fileblocks.py); by default the database's own family."""
        self.db = db
        self.root = db.root
        self.blocks = blocks if blocks is not None else BlockStore(db)
        self.units = UnitRecords(db)
        self.catalog = Catalog(db)
        self.lock = threading.RLock()
        self._ingests: dict[bytes, IngestPins] = {}
        # Blocks of ingests that committed while a GC was running: its mark may predate their version.
        self._retired: set[bytes] = set()
        self._gc_active = 0
        # Blocks a publisher pushed (or was told are here) for a commit it has not made yet: GC keeps
        # them for ``received_grace_s`` (the coordinator's block_grace), as it keeps an ingest's pins.
        self._received: dict[bytes, float] = {}
        self._received_pruned = time.monotonic()
        self.received_grace_s = 3600.0
        seed = db.meta(fmt.META_PREFILTER_SEED)
        self.prefilter_seed = fmt.read_u64(seed) if seed else 0
        # Set by a command that opens the store for itself (no daemon): close then waits for the
        # compactions its writes started, told why (cachepoint/store/compaction.py finish_compactions).
        self.finish_compactions: Callable[[str], None] | None = None

    @classmethod
    def open(cls, root: Path | str, writable: bool = False, create: bool = False) -> Store:
        return cls(StoreDB(Path(root), writable=writable, create=create))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        notice, self.finish_compactions = self.finish_compactions, None
        try:
            if notice is not None and self.db.writable and not self.db.salvaged:  # salvage: none run
                from cachepoint.store.compaction import finish_compactions

                finish_compactions(self, notice)
        except Exception:  # never a reason not to close
            pass
        finally:
            self.db.close()

    def absent(self, ids: Iterable[bytes], layer: str) -> list[bytes]:
        """The ids of ``ids`` this store does not hold, in their order. The newest local version of
        ``layer`` answers for its own blocks first: a committed version holds every block it names
        (a commit requires them, GC keeps them), and asking RocksDB about a block it holds reads the
        whole record (a pull of a new version, 27k chunks of which 24k are the old one's: 0.05 s
        instead of 0.42 s). The rest are asked one by one (bloom filters answer most)."""
        ids = list(ids)
        record = self.catalog.layer_or_none(layer)
        if record is not None and record.latest:  # the highest version held here (never deleted)
            newest = self.catalog.version(layer, record.latest)
            held = self.catalog.manifest(newest.manifest_digest).block_ids()
            ids = [digest for digest in ids if digest not in held]
        return self.blocks.missing(ids)

    def working_block_ids(self) -> set[bytes]:
        """Every block an attached disk's working map names (attached now or not): in use, so GC
        keeps them and fsck does not count them as garbage (see cachepoint/disk/working.py)."""
        return {value for _, value in self.db.scan(fmt.CF_WORKING, fmt.WORKING_ENTRY_PREFIX)}

    # -- ingests in progress -------------------------------------------------------------------

    def begin_ingest(self, layer: str) -> IngestPins:
        """Record an ingest durably before its first block, so an interruption is visible later."""
        ingest_id = secrets.token_bytes(16)
        record = {"layer": layer, "pid": os.getpid(), "started_ns": time.time_ns()}
        batch = self.db.batch()
        batch.put(ingest_id, json.dumps(record).encode(), self.db.handle[fmt.CF_INGESTS])
        self.db.write(batch, sync=True)
        pins = IngestPins(ingest_id, layer)
        with self.lock:
            self._ingests[ingest_id] = pins
        return pins

    def register_pins(self, layer: str) -> IngestPins:
        """Pins without an ingest record, for long-lived writers (an attached disk); end them with
        ``end_ingest(pins, committed=True)``."""
        pins = IngestPins(secrets.token_bytes(16), layer)
        with self.lock:
            self._ingests[pins.ingest_id] = pins
        return pins

    def pin(self, pins: IngestPins, digests: Iterable[bytes]) -> None:
        with self.lock:
            pins.digests.update(digests)

    def end_ingest(self, pins: IngestPins, *, committed: bool) -> None:
        """Forget a finished ingest. A failed one also drops its record (its blocks become garbage)."""
        with self.lock:
            self._ingests.pop(pins.ingest_id, None)
            if committed and self._gc_active:
                self._retired |= pins.digests
        if not committed:
            try:
                batch = self.db.batch()
                batch.delete(pins.ingest_id, self.db.handle[fmt.CF_INGESTS])
                self.db.write(batch, sync=True)
            except Exception:  # the disk may be full; the record then reads as an interrupted ingest
                pass

    def is_pinned(self, digest: bytes) -> bool:
        """Call with ``lock`` held."""
        if digest in self._retired or any(digest in pins.digests for pins in self._ingests.values()):
            return True
        return self._received.get(digest, -self.received_grace_s) > time.monotonic() - self.received_grace_s

    def note_received(self, digests: Iterable[bytes]) -> None:
        """Blocks that arrived for a commit still to come (PushBlocks), or that a pusher was told are
        here and will not send: kept from GC for ``received_grace_s``."""
        now = time.monotonic()
        with self.lock:
            for digest in digests:
                self._received[digest] = now
            if now - self._received_pruned > self.received_grace_s / 10:
                cutoff = now - self.received_grace_s
                self._received = {d: t for d, t in self._received.items() if t > cutoff}
                self._received_pruned = now

    def begin_gc(self) -> None:
        with self.lock:
            if not self._gc_active:
                self._retired.clear()
            self._gc_active += 1

    def end_gc(self) -> None:
        with self.lock:
            self._gc_active -= 1
            if not self._gc_active:
                self._retired.clear()

    def interrupted_ingests(self) -> list[InterruptedIngest]:
        """Ingest records with no live ingest in this process behind them."""
        found = []
        for key, raw in self.db.scan(fmt.CF_INGESTS):
            if key in self._ingests:
                continue
            data = json.loads(raw)
            found.append(InterruptedIngest(key, data["layer"], data["pid"], data["started_ns"]))
        return found

    def forget_interrupted(self, ingests: Iterable[InterruptedIngest]) -> None:
        batch = self.db.batch()
        for ingest in ingests:
            batch.delete(ingest.ingest_id, self.db.handle[fmt.CF_INGESTS])
        self.db.write(batch, sync=True)
