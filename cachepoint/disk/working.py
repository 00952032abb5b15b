"""The working layer: a disk's writes since its last snapshot, as block index -> digest.

Each written block is stored content-addressed like any other (encode_block, WAL-logged so that a
crash keeps what FLUSH made durable) and named in the disk's working map. A map entry is either a
block digest or the zero marker (cachepoint/disk/marker.py); no entry means "the layers below
show". The map lives in the store, so a disk keeps its changes across daemon restarts.

Layout, in the ``working`` family (cachepoint/store/format.py):

    0x00 "working-disk" 0x00 disk        -> JSON {"layer", "base", "block_size", "created_ns"}
    0x00 "working" 0x00 disk 0x00 index[u64 BE] -> digest[32]

``base`` is the version of the user layer the changes were made over (0: none yet). Entries that
were dropped because a write restored what the base held only mean something over that base, so a
working map with entries is refused over any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import rocksdict

from cachepoint.blocks import encode_block
from cachepoint.errors import InvalidInput
from cachepoint.ids import validate_layer_name
from cachepoint.store import format as fmt
from cachepoint.store.store import IngestPins, Store

HEADER_PREFIX = fmt.WORKING_HEADER_PREFIX
ENTRY_PREFIX = fmt.WORKING_ENTRY_PREFIX


def _header_key(disk: str) -> bytes:
    return HEADER_PREFIX + disk.encode()


def _entries_prefix(disk: str) -> bytes:
    return ENTRY_PREFIX + disk.encode() + fmt.SEP


def working_disks(store: Store) -> list[str]:
    """Disks with a working map in this store (attached or not)."""
    return [key[len(HEADER_PREFIX) :].decode() for key in store.db.scan_keys(fmt.CF_WORKING, HEADER_PREFIX)]


class WorkingLayer:
    """One disk's working map, loaded in memory and written through to the store.

    Not thread-safe for writers: CompositeDisk calls ``apply`` and ``stage_clear``/``reset``
    under its own lock. ``entries`` may be read from any thread (a dict lookup is atomic); a
    snapshot replaces the dict instead of clearing it, so a reader never sees it half-emptied.
    """

    def __init__(self, store: Store, disk: str, layer: str, block_size: int, base: int) -> None:
        self.store = store
        self.disk = disk
        self.layer = layer
        self.block_size = block_size
        self.base = base
        self.entries: dict[int, bytes] = {}
        self._created_ns = time.time_ns()
        self._dirty = False
        self._pins = _register_pins(store, layer)

    @classmethod
    def open(cls, store: Store, disk: str, layer: str, block_size: int, base: int) -> WorkingLayer:
        """Load (or start) the working map of ``disk``, a writable disk over ``layer``@``base``."""
        validate_layer_name(disk)
        validate_layer_name(layer)
        working = cls(store, disk, layer, block_size, base)
        try:
            working._load()
        except BaseException:
            working.close()
            raise
        return working

    def _load(self) -> None:
        prefix = _entries_prefix(self.disk)
        for key, digest in self.store.db.scan(fmt.CF_WORKING, prefix):
            self.entries[fmt.read_u64(key[len(prefix) :])] = digest
        raw = self.store.db.cf[fmt.CF_WORKING].get(_header_key(self.disk))
        if raw is not None:
            header = json.loads(raw)
            self._created_ns = header["created_ns"]
            made_over = (header["layer"], header["base"], header["block_size"])
            if self.entries and made_over != (self.layer, self.base, self.block_size):
                layer, base, block_size = made_over
                raise InvalidInput(
                    f"disk {self.disk!r} has unsnapshotted changes made over {layer}@{base} "
                    f"({block_size}-byte blocks), but it is now attached over {self.layer}@{self.base} "
                    f"({self.block_size}-byte blocks): snapshot or discard them first"
                )
        self.store.pin(self._pins, self.entries.values())
        batch = self.store.db.batch()
        self._stage_header(batch)
        self.store.db.write(batch, sync=True)

    def _stage_header(self, batch: rocksdict.WriteBatch) -> None:
        header = {
            "layer": self.layer,
            "base": self.base,
            "block_size": self.block_size,
            "created_ns": self._created_ns,
        }
        batch.put(_header_key(self.disk), json.dumps(header).encode(), self.store.db.handle[fmt.CF_WORKING])

    def apply(self, changes: dict[int, bytes | None], blocks: Iterable[tuple[bytes, bytes]]) -> None:
        """Store ``blocks`` ((digest, raw bytes)) the store lacks, then record ``changes``
        (index -> digest, or None to let the layers below show again). WAL-logged, not synced."""
        blocks = list(blocks)
        # Pin before asking whether a block exists, as ingest does: a GC sweep in this process
        # re-checks pins under the same lock before it deletes.
        self.store.pin(self._pins, (digest for digest, _ in blocks))
        missing = set(self.store.blocks.missing([digest for digest, _ in blocks]))
        values = {digest: encode_block(data) for digest, data in blocks if digest in missing}
        if values:
            self.store.blocks.put_many(values.items(), durable=True)
        handle = self.store.db.handle[fmt.CF_WORKING]
        prefix = _entries_prefix(self.disk)
        batch = self.store.db.batch()
        for index, digest in changes.items():
            if digest is None:
                batch.delete(prefix + fmt.u64(index), handle)
            else:
                batch.put(prefix + fmt.u64(index), digest, handle)
        self.store.db.write(batch)
        for index, digest in changes.items():
            if digest is None:
                self.entries.pop(index, None)
            else:
                self.entries[index] = digest
        self._dirty = True

    def sync(self) -> None:
        """Make every change applied so far durable: one synced write syncs the WAL behind it."""
        if not self._dirty:
            return
        self._dirty = False  # cleared first: a change applied meanwhile is synced by the next call
        batch = self.store.db.batch()
        self._stage_header(batch)
        self.store.db.write(batch, sync=True)

    def stage_clear(self, batch: rocksdict.WriteBatch, new_base: int) -> None:
        """Add the map's removal (and its new base) to a caller's batch: a snapshot's commit."""
        handle = self.store.db.handle[fmt.CF_WORKING]
        for key in self.store.db.scan_keys(fmt.CF_WORKING, _entries_prefix(self.disk)):
            batch.delete(key, handle)
        base, self.base = self.base, new_base
        try:
            self._stage_header(batch)
        finally:
            self.base = base

    def reset(self, new_base: int) -> dict[int, bytes]:
        """After the batch of ``stage_clear`` committed: an empty map over the new base."""
        self.base = new_base
        self.entries = {}
        # The committed version now references the blocks that matter; the rest of the pins are
        # blocks overwritten since, i.e. garbage. Renewing them keeps the pin set to one snapshot's
        # writes; committed=True hands them to a GC that is marking right now, as for an ingest.
        self.store.end_ingest(self._pins, committed=True)
        self._pins = _register_pins(self.store, self.layer)
        return self.entries

    def discard(self) -> None:
        """Drop every change since the last snapshot, and the map itself."""
        handle = self.store.db.handle[fmt.CF_WORKING]
        batch = self.store.db.batch()
        for key in self.store.db.scan_keys(fmt.CF_WORKING, _entries_prefix(self.disk)):
            batch.delete(key, handle)
        batch.delete(_header_key(self.disk), handle)
        self.store.db.write(batch, sync=True)
        self.entries = {}

    def pin(self, digests: Iterable[bytes]) -> None:
        self.store.pin(self._pins, digests)

    def close(self) -> None:
        """Stop protecting this disk's blocks from GC in this process (the map stays in the store)."""
        # committed=True: blocks a snapshot committed while a GC was marking stay kept by that GC.
        self.store.end_ingest(self._pins, committed=True)


def _register_pins(store: Store, layer: str) -> IngestPins:
    """Pins that keep this disk's new blocks from an in-process GC between their write and the write
    of the map entry that names them (GC marks every block the working maps name)."""
    return store.register_pins(layer)
