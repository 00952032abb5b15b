"""Decoded blocks kept for the next read, in a sparse file the kernel caches.

A block read from the store costs a RocksDB get and zstd decompression (tens of µs for 64 KiB); a
disk that boots or is copied reads the same blocks again. This cache keeps each
verified block's plain bytes in a slot of one file, so a warm read is one pread out of the page
cache straight into the reply's buffer. The kernel decides what stays in memory (a Python heap
cache would pin it), and the file only takes disk space for slots in use. (pwrite, not a shared
mapping: a store into a mapped hole faults once per page, which made filling 10x slower.)

Slots are found by block id and recycled with the CLOCK algorithm (a cheap approximation of least
recently used), made scan-resistant: a full cache takes a new block only where the hand finds a slot
unused since it last passed, else it clears that slot's bit and does not keep the block (nor pay its
write). Plain CLOCK turns a sequential read larger than the cache into FIFO and never hits: each block
is gone before the next pass. Here the blocks in use stay, and a read of a disk twice the cache's
size hits half of it from the second pass on; a block not used for a whole sweep still makes room.

A block enters it as its source gave it (cachepoint/blocksource: the store's records
are checked by RocksDB, blocks from other machines by their SHA-256), and each slot carries an
xxh3-64 of its bytes, checked on every hit (~3 µs), so a damaged cache file is noticed and the block
is read from its source again. The file is rebuilt
empty each time a daemon starts; it holds nothing the store does not.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import xxhash

from cachepoint.blocks import DEFAULT_BLOCK_SIZE
from cachepoint.blocksource.base import zero_after

log = logging.getLogger(__name__)
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: fail with EAGAIN instead of waiting for the disk


class DecodedCache:
    """Up to ``capacity`` bytes of decoded blocks of at most ``slot_size`` bytes each."""

    def __init__(self, path: Path, capacity: int, slot_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.slot_size = slot_size
        self.slots = max(1, capacity // slot_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.slots * slot_size)  # sparse: disk space only where slots are written
        self._index: dict[bytes, int] = {}
        self._digest: list[bytes | None] = [None] * self.slots
        self._length = [0] * self.slots
        self._check = [0] * self.slots
        self._used = bytearray(self.slots)  # CLOCK's reference bits
        self._hand = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.damaged = 0
        self.failed_writes = 0
        self.refused = 0  # blocks offered while the hand found only slots in use

    def copy_many(self, wanted: list[tuple[bytes, memoryview]], nowait: bool = False) -> list[int]:
        """Copy each (digest, target) block into the start of its target; returns the positions in
        ``wanted`` that were not copied (not cached, or damaged). ``nowait``: a block whose bytes are
        not in the page cache is not copied either (the read would wait for the disk), so that an
        event loop can try here first and go to a thread only when it must.

        Blocks in consecutive slots are read with one preadv (a sequential read fills slots in
        order, so a later read of the same range finds them that way): one system call per run
        instead of one per block."""
        missing: list[int] = []
        found: list[tuple[int, int, int, int]] = []  # position, slot, length, checksum
        with self._lock:
            for position, (digest, target) in enumerate(wanted):
                slot = self._index.get(digest)
                # A target shorter than the block (a disk's short last block over a longer layer
                # block) is left to the store: not worth a scratch buffer.
                if slot is None or self._length[slot] > len(target):
                    missing.append(position)
                    continue
                self._used[slot] = 1
                found.append((position, slot, self._length[slot], self._check[slot]))
            self.misses += len(missing)
        # Read outside the lock so that two readers' preads overlap. A slot may be recycled
        # meanwhile; its checksum then fails and that block is read from the store instead.
        run: list[tuple[int, int, int, int]] = []
        for item in found:
            if run and (item[1] != run[-1][1] + 1 or run[-1][2] != self.slot_size):
                self._read_run(run, wanted, missing, nowait)
                run = []
            run.append(item)
        if run:
            self._read_run(run, wanted, missing, nowait)
        return missing

    def _read_run(
        self,
        run: list[tuple[int, int, int, int]],
        wanted: list[tuple[bytes, memoryview]],
        missing: list[int],
        nowait: bool,
    ) -> None:
        targets = [wanted[position][1][:length] for position, _, length, _ in run]
        try:
            got = os.preadv(self._fd, targets, run[0][1] * self.slot_size, _NOWAIT if nowait else 0)
        except OSError:  # not in the page cache (nowait), or unreadable: the store answers instead
            got = 0
        for (position, slot, length, check), target in zip(run, targets, strict=True):
            got -= length
            if got >= 0 and xxhash.xxh3_64_intdigest(target) == check:
                self.hits += 1
                zero_after(wanted[position][1], length)  # a short block in a longer target
                continue
            missing.append(position)
            if got >= 0:  # read whole but wrong: unless the slot was recycled, the file is damaged
                with self._lock:
                    if self._index.get(wanted[position][0]) == slot and self._check[slot] == check:
                        self.damaged += 1
                        self._forget(slot)

    def holds_all(self, ids: Sequence[bytes]) -> bool:
        """Whether every block of ``ids`` has a slot (the index alone: nothing is read, no use is
        counted)."""
        index = self._index
        with self._lock:
            return all(digest in index for digest in ids)

    def get_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        """The cached blocks of ``ids``, each a copy of exactly its bytes."""
        with self._lock:
            lengths = {d: self._length[slot] for d in ids if (slot := self._index.get(d)) is not None}
        buffers = {digest: bytearray(length) for digest, length in lengths.items()}
        wanted = [(digest, memoryview(buffer)) for digest, buffer in buffers.items()]
        lost = {wanted[position][0] for position in self.copy_many(wanted)}
        return {digest: bytes(buffer) for digest, buffer in buffers.items() if digest not in lost}

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        """Keep a block whose bytes are those of ``digest``."""
        self.put_many([(digest, data)])

    def put_many(self, blocks: list[tuple[bytes, bytes | memoryview]]) -> None:
        """Keep blocks, in consecutive slots where the clock allows: one read's blocks,
        put together, can then be read back together (see ``copy_many``)."""
        with self._lock:
            for digest, data in blocks:
                if len(data) > self.slot_size or digest in self._index:
                    continue  # larger than a slot: not cached
                slot = self._victim()
                if slot is None:
                    self.refused += 1
                    continue
                try:
                    os.pwrite(self._fd, data, slot * self.slot_size)
                except OSError as err:  # a full disk must cost the cache, never the read
                    self.failed_writes += 1
                    if self.failed_writes == 1:
                        log.warning("read cache %s: cannot write (%s); blocks are not kept", self.path, err)
                    return
                self._index[digest] = slot
                self._digest[slot] = digest
                self._length[slot] = len(data)
                self._check[slot] = xxhash.xxh3_64_intdigest(data)
                self._used[slot] = 1

    def _victim(self) -> int | None:
        """The slot at the hand, emptied, if it was not used since the hand last passed; else None,
        with its use cleared (one step of CLOCK's sweep per block offered)."""
        slot = self._hand
        self._hand = (slot + 1) % self.slots
        if self._used[slot]:
            self._used[slot] = 0
            return None
        self._forget(slot)
        return slot

    def _forget(self, slot: int) -> None:
        old = self._digest[slot]
        if old is not None:
            del self._index[old]
            self._digest[slot] = None

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
