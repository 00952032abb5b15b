"""Blocks in the store: presence, staged writes, raw reads, sizes.

Readers get plain blocks through cachepoint/blocksource (``StoreSource``: decoded, not hashed: blocks
are verified once, on their way in). ``read`` hashes on purpose, for the checks that look for rot."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import rocksdict

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockMissing, BlockUnreadable
from cachepoint.ids import BlockId
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB

# A pull's blocks, written without the WAL (``put_fetched``), are flushed in the background each time
# this many bytes of them have been written: a pull killed midway keeps all it stored but about this
# much, and a large pull leaves SST files of about this size (level 0 compacts each 12 of them).
FLUSH_EVERY = 16 * 1024 * 1024


class BlockStore:
    in_database = True  # GC gives space back by compacting the family (cachepoint/store/compaction.py)

    def __init__(self, db: StoreDB) -> None:
        # Column-family objects are looked up on each use, never cached here: each one keeps the
        # database (and its lock) alive, and StoreDB.close() must be able to drop them all.
        self._db = db
        self._unflushed = 0  # bytes put_fetched wrote since it last asked for a flush
        self._unflushed_lock = threading.Lock()  # put_fetched runs on several threads at once

    @property
    def _cf(self) -> rocksdict.Rdict:
        return self._db.cf[fmt.CF_BLOCKS]

    @property
    def _handle(self) -> rocksdict.ColumnFamily:
        return self._db.handle[fmt.CF_BLOCKS]

    def has(self, digest: bytes) -> bool:
        # key_may_exist answers "no" from the bloom filter without I/O; only a "maybe" costs a read.
        if not self._cf.key_may_exist(digest):
            return False
        return self._cf.get(digest) is not None

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if not self.has(d)]

    def put_many(
        self,
        values: Iterable[tuple[bytes, bytes]],
        durable: bool = False,
        unit_records: Iterable[tuple[bytes, bytes]] = (),
    ) -> int:
        """Write encoded blocks. By default with the WAL off (an ingest: durable only after
        ``persist()``); ``durable`` logs them (blocks received from the network, so that a pull or a
        push killed midway keeps what it stored). ``unit_records``: (chunk id, encoded record) of the
        ``units`` family (cachepoint/store/units.py), written in the same batch."""
        batch = self._db.batch()
        written = batch.put_many(values, self._handle)
        units = self._db.handle.get(fmt.CF_UNITS)
        if units is not None:
            for digest, record in unit_records:
                batch.put(digest, record, units)
        self._db.write(batch, wal=durable)
        return written

    def put_fetched(
        self,
        values: Iterable[tuple[bytes, bytes]],
        unit_records: Iterable[tuple[bytes, bytes]] = (),
        *,
        logged: bool,
    ) -> int:
        """Write verified blocks that arrived from another machine. ``logged``: with the WAL, each kept
        as soon as it is written. Otherwise for a pull that calls ``persist`` before its version
        commits: written once, without the WAL. Logged, each block goes to disk twice (the WAL, then
        the memtable's flush), and the WAL's copy runs with the GIL held (0.1 s for the 38 MiB of the
        benchmark's real image, and as much again in the close's flush). Unlogged blocks are flushed
        in the background each FLUSH_EVERY bytes, so that a killed pull keeps nearly all it stored
        and the next one fetches only the rest."""
        if logged:
            return self.put_many(values, True, unit_records)
        written = self.put_many(values, False, unit_records)
        with self._unflushed_lock:
            self._unflushed += written
            due = self._unflushed >= FLUSH_EVERY
            if due:
                self._unflushed = 0
        if due:
            self._db.flush(fmt.CF_BLOCKS, wait=False)
        return written

    def persist(self) -> None:
        """Make every staged block durable; called before any version that names them commits."""
        self._db.flush(fmt.CF_BLOCKS)

    def raw(self, digest: bytes) -> bytes | None:
        try:
            return self._cf.get(digest)
        except Exception as err:  # RocksDB's own checks (e.g. a block checksum) refused the read
            raise BlockUnreadable(BlockId(digest), err) from err

    def raw_many(self, digests: list[bytes]) -> list[bytes | None]:
        """Stored values in order (None where absent). A block the database cannot read raises
        BlockUnreadable naming that block, not the batch."""
        if not digests:
            return []
        try:
            return self._cf.get(digests)
        except Exception:
            return [self.raw(digest) for digest in digests]

    def read(self, digest: bytes) -> bytes:
        """One block, decoded and checked against its id (SHA-256): for checks (heal), not readers."""
        value = self.raw(digest)
        if value is None:
            raise BlockMissing(BlockId(digest))
        return decode_verified(digest, value)

    def delete_many(self, digests: Iterable[bytes], older_than: float | None = None) -> list[bytes]:
        """The named blocks, deleted; returns those that went (here all: GC's pins protect the
        ingests in progress). ``older_than``: for stores that know when a block was written
        (FileBlocks)."""
        batch = self._db.batch()
        gone: list[bytes] = []
        units = self._db.handle.get(fmt.CF_UNITS)  # a chunk's unit digests go with it
        for digest in digests:
            batch.delete(digest, self._handle)
            if units is not None:
                batch.delete(digest, units)
            gone.append(digest)
        if gone:
            self._db.write(batch, sync=True)
        return gone

    def scan(self) -> Iterator[tuple[bytes, bytes]]:
        return self._db.scan(fmt.CF_BLOCKS)

    def scan_sizes(self) -> Iterator[tuple[bytes, int, float]]:
        """(id, stored size, 0.0: no write time kept) of every block."""
        return ((digest, len(value), 0.0) for digest, value in self._db.scan(fmt.CF_BLOCKS))

    def scan_ids(self) -> Iterator[bytes]:
        return self._db.scan_keys(fmt.CF_BLOCKS)

    def scan_unchecked(self, after: bytes | None, limit: int) -> tuple[list[tuple[bytes, bytes]], str]:
        """Up to ``limit`` stored (id, value) pairs in key order, after ``after`` (None: from the
        first), read with RocksDB's block checksums off and without filling its block cache; and the
        iterator's error text ("" if none), when it could not go on.

        For the scrub, which verifies every value against its id (SHA-256, stronger than RocksDB's
        CRC): with checksums on, an iterator stops dead at the first damaged data block (rocksdict
        then simply ends the iteration), so every block after it would go unchecked. A fresh
        iterator per call pins SST files only for the duration of one batch."""
        options = rocksdict.ReadOptions()
        options.set_verify_checksums(False)
        options.fill_cache(False)
        iterator = self._cf.iter(options)
        found: list[tuple[bytes, bytes]] = []
        error = ""
        try:
            if after is None:
                iterator.seek_to_first()
            else:
                iterator.seek(after)
                if iterator.valid() and iterator.key() == after:
                    iterator.next()
            while iterator.valid() and len(found) < limit:
                found.append((iterator.key(), iterator.value()))
                iterator.next()
            try:
                iterator.status()
            except Exception as err:  # RocksDB's status text: the family cannot be read past here
                error = str(err)
        finally:
            del iterator  # it keeps the database open: never let it outlive the call
        return found, error
