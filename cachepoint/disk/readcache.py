"""Decoded blocks kept for the next read, in a sparse file the kernel caches.

A block read from the store costs a RocksDB get and zstd decompression (tens of µs for 64 KiB); a
disk that boots or is copied reads the same blocks again. This cache keeps each
verified block's plain bytes in one file, so a warm read is one pread out of the page
cache straight into the reply's buffer. The kernel decides what stays in memory (a Python heap
cache would pin it), and the file only takes disk space where blocks are written. (pwrite, not a
shared mapping: a store into a mapped hole faults once per page, which made filling 10x slower.)

Blocks differ in length: fixed 64 KiB blocks, content chunks from half to four times their average,
a file's short last block. Each block takes as many consecutive granules (4 KiB) of the file as it
needs, so the cache holds ``capacity`` bytes of blocks of any mix of lengths (fixed 64 KiB slots held
half that of 32 KiB chunks, and never a chunk longer than 64 KiB).

Room is made with the CLOCK algorithm (a cheap approximation of least recently used) over those
extents, made scan-resistant: a hand walks the file; a new block goes where the hand is only if
every block it would cover there was unused since the hand last passed (those are dropped), else the
hand clears the first used block's bit, moves past it, and the new block is not kept (nor its write
paid). Plain CLOCK turns a sequential read larger than the cache into FIFO and never hits: each
block is gone before the next pass. The hand's speed is what keeps blocks: it may move half a
granule per granule hit and an eighth per granule offered, no faster. A hand moved by every miss
went round the cache more than once per pass as soon as a disk was over twice the cache, dropped
every block before its next use, and a pass hit nothing; now a read of a disk N times the cache's
size hits 1/N of it from the second pass on (all of that up to N = 5, most of it beyond), while a
new working set still replaces an old one within a few passes (hits pay for the hand). Blocks put
together land next to each other, so a later read of the same range reads them with one preadv.

A block enters it as its source gave it (cachepoint/blocksource: the store's records
are checked by RocksDB, blocks from other machines by their SHA-256), and each block carries an
xxh3-64 of its bytes, checked on every hit (~3 µs), so a damaged cache file is noticed and the block
is read from its source again. The file is rebuilt
empty each time a daemon starts; it holds nothing the store does not.
"""

from __future__ import annotations

import array
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import xxhash

from cachepoint.blocksource.base import zero_after

log = logging.getLogger(__name__)
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: fail with EAGAIN instead of waiting for the disk

GRANULE = 4096  # the file is handed out in pages: a block's tail wastes under one page of address space
LARGEST_SHARE = 4  # a block longer than a quarter of the cache is not kept: it would push out too many
FREE = -1
# How far the hand may move: half a granule per granule hit, an eighth per granule offered (see _room).
HIT_CREDIT = 2
MISS_CREDIT = 8


class DecodedCache:
    """Up to ``capacity`` bytes of decoded blocks, each in whole ``granule``s of one file."""

    def __init__(self, path: Path, capacity: int, granule: int = GRANULE) -> None:
        self.granule = granule
        self.granules = max(1, capacity // granule)
        self.largest = max(granule, self.granules * granule // LARGEST_SHARE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.granules * granule)  # sparse: disk space only where blocks are written
        n = self.granules
        # Per granule: the first granule of the block that covers it, or FREE. The others are read
        # at a block's first granule only (its "start"). Arrays, not lists: 25 bytes a granule
        # (6.5 MB per GiB of cache), no Python object per block but its id.
        self._owner = array.array("i", [FREE]) * n
        self._index: dict[bytes, int] = {}  # block id -> its start
        self._digest: list[bytes | None] = [None] * n
        self._length = array.array("i", bytes(4 * n))
        self._check = array.array("Q", bytes(8 * n))
        self._used = bytearray(n)  # CLOCK's reference bits
        self._hand = 0
        self._credit = 0.0  # granules the hand may still pass (see _room)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.damaged = 0
        self.failed_writes = 0
        self.refused = 0  # blocks offered while the hand found blocks in use

    def _span(self, length: int) -> int:
        return -(-length // self.granule) or 1

    def copy_many(self, wanted: list[tuple[bytes, memoryview]], nowait: bool = False) -> list[int]:
        """Copy each (digest, target) block into the start of its target; returns the positions in
        ``wanted`` that were not copied (not cached, or damaged). ``nowait``: a block whose bytes are
        not in the page cache is not copied either (the read would wait for the disk), so that an
        event loop can try here first and go to a thread only when it must.

        Blocks that lie end to end in the file (a sequential read puts them there, so a later read
        of the same range finds them that way) are read with one preadv: one system call per run
        instead of one per block."""
        missing: list[int] = []
        found: list[tuple[int, int, int, int]] = []  # position, start, length, checksum
        with self._lock:
            for position, (digest, target) in enumerate(wanted):
                start = self._index.get(digest)
                # A target shorter than the block (a disk's short last block over a longer layer
                # block) is left to the store: not worth a scratch buffer.
                if start is None or self._length[start] > len(target):
                    missing.append(position)
                    continue
                self._used[start] = 1
                length = self._length[start]
                self._credit += -(-length // self.granule) / HIT_CREDIT
                found.append((position, start, length, self._check[start]))
            self.misses += len(missing)
            if self._credit > self.granules:
                self._credit = self.granules
        # Read outside the lock so that two readers' preads overlap. A block may be dropped
        # meanwhile; its checksum then fails and that block is read from the store instead.
        granule = self.granule
        run: list[tuple[int, int, int, int]] = []
        for item in found:
            if run:
                _, start, length, _ = run[-1]
                # The next block must begin where this one's bytes end: no gap inside a granule.
                if length % granule or item[1] != start + length // granule:
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
            got = os.preadv(self._fd, targets, run[0][1] * self.granule, _NOWAIT if nowait else 0)
        except OSError:  # not in the page cache (nowait), or unreadable: the store answers instead
            got = 0
        for (position, start, length, check), target in zip(run, targets, strict=True):
            got -= length
            if got >= 0 and xxhash.xxh3_64_intdigest(target) == check:
                self.hits += 1
                zero_after(wanted[position][1], length)  # a short block in a longer target
                continue
            missing.append(position)
            if got >= 0:  # read whole but wrong: unless the block was dropped, the file is damaged
                with self._lock:
                    if self._index.get(wanted[position][0]) == start and self._check[start] == check:
                        self.damaged += 1
                        self._forget(start)

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
        """Keep blocks, end to end where the clock allows: one read's blocks, put together, can
        then be read back together (see ``copy_many``)."""
        with self._lock:
            for digest, data in blocks:
                if len(data) > self.largest or digest in self._index:
                    continue
                start = self._room(self._span(len(data)))
                if start is None:
                    self.refused += 1
                    continue
                try:
                    os.pwrite(self._fd, data, start * self.granule)
                except OSError as err:  # a full disk must cost the cache, never the read
                    self.failed_writes += 1
                    if self.failed_writes == 1:
                        log.warning("read cache %s: cannot write (%s); blocks are not kept", self.path, err)
                    return
                span = self._span(len(data))
                self._owner[start : start + span] = array.array("i", [start]) * span
                self._index[digest] = start
                self._digest[start] = digest
                self._length[start] = len(data)
                self._check[start] = xxhash.xxh3_64_intdigest(data)
                self._used[start] = 1
                self._hand = start + span

    def _room(self, span: int) -> int | None:
        """``span`` free granules at the hand, made by dropping the blocks there if none of them was
        used since the hand last passed; else None, the first used one's bit cleared and the hand
        past it (one step of CLOCK's sweep per block offered). Moving the hand costs credit, which
        hits and offers earn (HIT_CREDIT, MISS_CREDIT): without enough, the block is not kept and
        the hand stays."""
        if self._hand + span > self.granules:  # too little before the end: the sweep starts again
            self._pass(self._hand, self.granules)
            self._hand = 0
        hand = self._hand
        owners = self._owner[hand : hand + span]
        if max(owners) == FREE:
            return hand
        self._credit += span / MISS_CREDIT
        if self._credit < span:
            return None
        for start in sorted(set(owners) - {FREE}):  # the blocks under [hand, hand + span), in order
            if self._used[start]:
                self._used[start] = 0
                self._hand = start + self._span(self._length[start])
                self._credit -= self._hand - hand
                return None
            self._forget(start)
        self._credit -= span
        return hand

    def _pass(self, begin: int, end: int) -> None:
        """The hand passes [begin, end) without placing anything: used blocks lose their bit, the
        others are dropped."""
        granule = begin
        while granule < end:
            start = self._owner[granule]
            if start == FREE:
                granule += 1
                continue
            granule = start + self._span(self._length[start])  # past this block (it covers granule)
            if self._used[start]:
                self._used[start] = 0
            else:
                self._forget(start)

    def _forget(self, start: int) -> None:
        old = self._digest[start]
        if old is None:
            return
        del self._index[old]
        self._digest[start] = None
        span = self._span(self._length[start])
        self._owner[start : start + span] = array.array("i", [FREE]) * span
        self._used[start] = 0

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
