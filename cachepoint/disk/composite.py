"""A composite disk as a block device: layers read through, the user's writes copy-on-write.

Each block reads from the user's working layer if it names the block, else from the topmost layer
of the stack that holds data there (cachepoint/layers/composite.py's rule: a hole lets the block
below show; no layer at all reads as zeros). A stack with content-chunked layers reads by its pieces
(cachepoint/layers/pieces.py); its user's writes still go on a grid. Blocks come from one source
(cachepoint/blocksource):
the local store, or for a lazily booted disk the store with the fleet behind it, read through a cache
of decoded blocks.

Writes never touch the layers: a write computes the whole new block (read-modify-write when it
covers part of one) and records it in the working layer, or drops the working entry when the new
block is what the layers below already hold, so rewriting unchanged data does not grow the user's
layer. Zeros over data are recorded as the zero marker.

Store calls block, so the async methods run them in threads; one lock orders the writers (two
partial writes into one block must not both read the old block), readers need none.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cachepoint.blocks import block_digest, is_hole, zeros
from cachepoint.blocksource import BlockSource, CachedSource, MemoryCache, StoreSource, Target, WriteBack
from cachepoint.disk.buffers import ReplyBuffers
from cachepoint.disk.marker import reads_as_zeros, zero_marker
from cachepoint.disk.readcache import DecodedCache
from cachepoint.disk.working import WorkingLayer
from cachepoint.errors import BlockMissing, InvalidInput, OutOfSpace
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST, BlockId
from cachepoint.layers.composite import composite_disks, grid_size
from cachepoint.layers.export import PlacedFile
from cachepoint.layers.pieces import Pieces, add_run
from cachepoint.model import FileEntry, Manifest, VersionInfo
from cachepoint.store.store import Store

CACHE_BYTES = 16 * 1024 * 1024  # decoded blocks kept: a partial write reads its block back at once
READAHEAD_BLOCKS = 32  # named to a far source on a cold read: 2 MiB at 64 KiB blocks, one round trip

Stack = list[tuple[VersionInfo, Manifest]]

# The id of a grid block that the layers below hold only in pieces (a content-chunked layer under
# the grid, cut by upper blocks): it is read piece by piece. Never a SHA-256 of anything stored.
COMPOSED = b"\xffcomposed of pieces, see pieces\xff"
assert len(COMPOSED) == DIGEST_SIZE

# Cold reads decompress; more threads than cores only fight over the GIL between those
# steps (a cold copy of a 1 GiB disk by qemu-img, 8 requests in flight: 2.2 s with 6 threads, 1.35 s with 2).
_COLD_READERS = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="disk-read")


@dataclass(frozen=True, slots=True)
class _View:
    """What reads see, swapped whole by a snapshot: the layers' blocks and the working entries."""

    lower: bytes  # packed digests of the composited stack, HOLE_DIGEST where no layer has data
    entries: dict[int, bytes]
    # Block indexes where the layers below switch between zeros and data, the first always 0:
    # block status answers from it in O(log n) instead of looking at every block of a run.
    switches: list[int]
    lower_zeros_first: bool
    lower_zeros: bytes  # one byte per block of ``lower``: 1 where it reads as zeros

    @classmethod
    def of(cls, lower: bytes, entries: dict[int, bytes], size: int, block_size: int) -> _View:
        switches: list[int] = []
        first = False
        previous: bool | None = None
        count = len(lower) // DIGEST_SIZE
        flags = bytearray(count)
        for index in range(count):
            length = min(block_size, size - index * block_size)
            zeros = reads_as_zeros(lower[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE], length)
            flags[index] = zeros
            if zeros != previous:
                if previous is None:
                    first = zeros
                switches.append(index)
                previous = zeros
        return cls(lower, entries, switches, first, bytes(flags))

    def lower_run(self, index: int) -> tuple[int, bool]:
        """(first block after the run that holds ``index``, whether the run reads as zeros)."""
        at = bisect.bisect_right(self.switches, index)
        end = self.switches[at] if at < len(self.switches) else len(self.lower) // DIGEST_SIZE
        return max(end, index + 1), self.lower_zeros_first ^ (at % 2 == 0)

    def digest(self, index: int) -> bytes:
        found = self.entries.get(index)
        if found is not None:
            return found
        return self.lower[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def lower_digest(self, index: int) -> bytes:
        return self.lower[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]


class CompositeDisk:
    """A BlockDevice (cachepoint/disk/nbd.py) over a stack of disk-image versions, lowest first.

    With a working layer the disk is writable; the user layer's current version, if it has one,
    must then be the top of the stack (the working layer's base).
    """

    def __init__(
        self,
        store: Store,
        stack: Stack,
        working: WorkingLayer | None = None,
        source: BlockSource | None = None,
        decoded: DecodedCache | None = None,
    ) -> None:
        """Blocks come from ``source`` (default: the store; a lazily booted disk's: the store with the
        fleet behind it, ``WriteBack``), read through ``decoded`` (the daemon's cache shared by every
        disk; default: a small one of this disk's own)."""
        if not stack:
            raise InvalidInput("a disk needs at least one layer")
        tree = [info.ref for info, manifest in stack if not manifest.single_file]
        if tree:
            raise InvalidInput(f"{', '.join(tree)} holds a tree, not a disk image: it cannot be attached")
        placed = composite_disks(stack)  # also refuses fixed layers of different block sizes
        self.store = store
        self.stack: Stack = list(stack)
        self.working = working
        self._size = placed.entry.size
        self.lock = threading.Lock()  # writers and snapshots
        self.inner = source or StoreSource(store)
        self.decoded = decoded  # blocks shared by every disk of a daemon (readcache.py)
        self.source = CachedSource(self.inner, decoded if decoded is not None else MemoryCache(CACHE_BYTES))
        # Reads' reply buffers, given back by the NBD server once a reply has left (buffers.py).
        self.buffers = ReplyBuffers()
        # A stack with content-chunked layers reads by its pieces (cachepoint/layers/pieces.py);
        # writes still go on a grid, the working layer's.
        self._pieces = _pieces_of(placed)
        self._block_size = placed.block_size if self._pieces is None else grid_size(self.stack)
        if working is not None:
            self._check_working(working)
        self._view = _View.of(
            self._on_grid(placed, self._pieces) if self._pieces is None or working is not None else b"",
            working.entries if working else {},
            self._size,
            self._block_size,
        )

    def _on_grid(self, placed: PlacedFile, pieces: Pieces | None) -> bytes:
        """The packed ids of a composited stack's blocks on this disk's grid (COMPOSED where the
        layers hold them only in ``pieces``, its own: ``_pieces_of(placed)``)."""
        if pieces is not None:
            return pieces.on_grid(self._block_size, COMPOSED)
        return placed.entry.blocks

    def _check_working(self, working: WorkingLayer) -> None:
        if working.block_size != self._block_size:
            raise InvalidInput(
                f"the working layer of {working.disk!r} uses {working.block_size}-byte blocks, "
                f"the image {self._block_size}"
            )
        layers = [info.layer for info, _ in self.stack]
        if working.layer in layers[:-1]:
            raise InvalidInput(f"the user layer {working.layer!r} must be the top of the stack")
        if working.base != self.user_base:
            raise InvalidInput(
                f"the working layer of {working.disk!r} sits on {working.layer}@{working.base}, "
                f"the stack has {working.layer}@{self.user_base}"
            )

    # -- what the NBD server asks ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self.working is None

    @property
    def block_size(self) -> int:
        return self._block_size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        # A read the caches hold in memory is a few copies: done here, it skips two thread
        # switches and the GIL contention of several readers (3x faster for a warm copy).
        warm = self._read(offset, length, warm_only=True)
        if warm is not None:
            return warm
        return await self.read_cold(offset, length)

    async def read_cold(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """``read`` in a thread, without trying memory first (the caller just did: read_warm)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_COLD_READERS, self.read_sync, offset, length)

    def release(self, payload: object) -> None:
        """A read's reply has left: its buffer may serve the next read (buffers.py)."""
        self.buffers.give(payload)

    def read_warm(self, offset: int, length: int) -> bytes | bytearray | memoryview | None:
        """The bytes at ``offset`` if every block is in memory (or the page cache), else None: the
        NBD server answers such a read without a task or a thread."""
        return self._read(offset, length, warm_only=True)

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.to_thread(self.write_sync, offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await asyncio.to_thread(self.write_zeroes_sync, offset, length)

    async def trim(self, offset: int, length: int) -> None:
        # After a trim the client may assume nothing of those bytes; zeros are the cheapest
        # answer that never lets stale lower-layer data reappear later.
        await asyncio.to_thread(self.write_zeroes_sync, offset, length)

    async def flush(self) -> None:
        if self.working is not None:
            await asyncio.to_thread(self.flush_sync)

    # -- the same, blocking ---------------------------------------------------------------------

    def read_sync(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        data = self._read(offset, length, warm_only=False)
        assert data is not None
        return data

    def _read(self, offset: int, length: int, warm_only: bool) -> bytes | bytearray | memoryview | None:
        """The bytes at ``offset``; with ``warm_only``, None unless every block is in memory."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        if self._pieces is not None and self.working is None:
            return self._read_pieces(self._pieces, offset, length, warm_only)
        bs = self._block_size
        first, last = offset // bs, (offset + length - 1) // bs
        span, zeroed = self.buffers.take((last - first + 1) * bs)
        if not self._fill(self._view, first, last + 1, memoryview(span), warm_only, zeroed):
            self.buffers.give(span)  # a warm attempt that gave up: nobody holds it
            return None
        start = offset - first * bs
        if start == 0 and len(span) == length:
            return span
        return memoryview(span)[start : start + length]

    def zero_runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Runs from ``offset`` as (bytes, reads as zeros), from the block ids alone (NBD block
        status): nothing is read or fetched, so a client can skip what is all zeros."""
        self._check_range(offset, length)
        if self._pieces is not None and self.working is None:
            return self._pieces.zero_runs(offset, length, limit)
        view, bs, end = self._view, self._block_size, offset + length
        runs: list[tuple[int, bool]] = []
        pos, index = offset, offset // bs
        while pos < end:
            if view.entries:  # the user wrote: look at each block
                zeros, stop = reads_as_zeros(view.digest(index), self.block_length(index)), index + 1
            else:
                stop, zeros = view.lower_run(index)
            step = min(stop * bs, end) - pos
            if not add_run(runs, step, zeros, limit):
                break
            pos += step
            index = stop
        return runs

    def write_sync(self, offset: int, data: bytes) -> None:
        self._modify(offset, len(data), lambda a, b: data[a - offset : b - offset], zeros=False)

    def write_zeroes_sync(self, offset: int, length: int) -> None:
        self._modify(offset, length, lambda a, b: bytes(b - a), zeros=True)

    def flush_sync(self) -> None:
        if self.working is None:
            return
        try:
            self.working.sync()
        except OutOfSpace as err:
            raise OSError(errno.ENOSPC, str(err)) from err

    def close(self) -> None:
        if self.working is not None:
            self.working.close()

    # -- blocks ---------------------------------------------------------------------------------

    def block_length(self, index: int) -> int:
        return min(self._block_size, self._size - index * self._block_size)

    @property
    def block_count(self) -> int:
        return -(-self._size // self._block_size)

    @property
    def user_base(self) -> int:
        """The number of the user layer's version at the top of the stack (0: none)."""
        if self.working is None:
            return 0
        top = self.stack[-1][0]
        return top.number if top.layer == self.working.layer else 0

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"bytes {offset}..{offset + length} are outside the {self._size}-byte disk")

    @property
    def fetched_lazily(self) -> int:
        """Blocks reads had to fetch from the fleet (their own and their readahead)."""
        return self.inner.fetched if isinstance(self.inner, WriteBack) else 0

    def _fill(
        self,
        view: _View,
        first: int,
        stop: int,
        out: memoryview,
        warm_only: bool = False,
        zeroed: bool = True,
    ) -> bool:
        """Copy blocks ``first``..``stop`` into ``out`` (one block size per block) from the source.
        Holes and zero markers read as zeros: left as they are in a zero-filled ``out`` (``zeroed``),
        written in one that is not (a reply buffer used again). With ``warm_only`` nothing waits: False
        as soon as a block is neither in memory nor in the page cache."""
        bs = self._block_size
        entries, lower, lower_zeros = view.entries, view.lower, view.lower_zeros
        full_blocks = self._size // bs  # blocks before this one are whole
        wanted: list[Target] = []
        composed: list[list[int]] = []  # [first byte in out, bytes] of runs of COMPOSED blocks
        # The loop runs per 64 KiB block of every read: it stays flat (no calls it can avoid).
        for index in range(first, stop):
            length = bs if index < full_blocks else self.block_length(index)
            digest = entries.get(index) if entries else None
            at = (index - first) * bs
            if digest is None:
                if lower_zeros[index]:
                    if not zeroed:
                        out[at : at + length] = zeros(length)
                    continue
                digest = lower[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
                if digest == COMPOSED:
                    if composed and composed[-1][0] + composed[-1][1] == at:
                        composed[-1][1] += length
                    else:
                        composed.append([at, length])
                    continue
            elif reads_as_zeros(digest, length):
                if not zeroed:
                    out[at : at + length] = zeros(length)
                continue
            wanted.append((digest, out[at : at + length]))
        if warm_only and not self.source.holds_all([digest for digest, _ in wanted]):
            # Asked before copying: a warm attempt that copied the cached blocks of a range half in
            # the cache would give up at the first other one, and the thread's read copy them again.
            return False
        if composed:
            assert self._pieces is not None
            for at, length in composed:
                where = out[at : at + length]
                if not self._fill_pieces(self._pieces, first * bs + at, where, warm_only, zeroed):
                    return False
        if not wanted:
            return True
        also = self._readahead(view, stop) if self.inner.far and not warm_only else ()
        missing = self.source.read_into(wanted, nowait=warm_only, also=also)
        if not missing:
            return True
        if warm_only:
            return False
        raise BlockMissing(BlockId(wanted[missing[0]][0]))

    def _read_pieces(self, pieces: Pieces, offset: int, length: int, warm_only: bool) -> bytearray | None:
        """``_read`` of a read-only disk with content-chunked layers: the pieces under the range, by
        binary search (a piece wholly inside the range is copied straight into place)."""
        out, zeroed = self.buffers.take(length)
        if self._fill_pieces(pieces, offset, memoryview(out), warm_only, zeroed):
            return out
        self.buffers.give(out)  # a warm attempt that gave up: nobody holds it
        return None

    def _fill_pieces(
        self, pieces: Pieces, offset: int, out: memoryview, warm_only: bool, zeroed: bool = True
    ) -> bool:
        """Bytes [offset, offset + len(out)) from the pieces into ``out`` (``zeroed``: zero-filled,
        else the gaps are written too); on a lazy disk the blocks of the pieces after them are the
        readahead of a fetch."""
        also: Sequence[bytes] = ()
        if self.inner.far and not warm_only:
            also = self._pieces_ahead(pieces, pieces.between(offset, offset + len(out)).stop)
        return pieces.read_into(self.source, offset, out, nowait=warm_only, also=also, zeroed=zeroed)

    def _pieces_ahead(self, pieces: Pieces, start: int) -> list[bytes]:
        return list(dict.fromkeys(pieces.digests[start : start + READAHEAD_BLOCKS]))

    def _remember(self, digest: bytes, data: bytes) -> None:
        """Keep a block just written (named by its own digest) for the next read."""
        self.source.remember([(digest, data)])

    def _block(self, view: _View, index: int) -> bytes:
        block = bytearray(self._block_size)
        self._fill(view, index, index + 1, memoryview(block))
        return bytes(block[: self.block_length(index)])

    def _readahead(self, view: _View, stop: int) -> Sequence[bytes]:
        """Ids of the blocks after a read, for a source where a miss costs a round trip: sequential
        reads (a boot, a copy) then find them here instead of paying a round trip each."""
        ahead: list[bytes] = []
        for index in range(stop, min(stop + READAHEAD_BLOCKS, self.block_count)):
            digest = view.digest(index)
            if digest == COMPOSED and self._pieces is not None:
                start = index * self._block_size
                pieces = self._pieces.between(start, start + self.block_length(index))
                ahead += self._pieces.digests[pieces.start : pieces.stop]
            elif not reads_as_zeros(digest, self.block_length(index)):
                ahead.append(digest)
        return ahead

    def _modify(self, offset: int, length: int, piece: Callable[[int, int], bytes], zeros: bool) -> None:
        working = self.working
        if working is None:
            raise PermissionError(errno.EPERM, "this disk is attached read-only")
        self._check_range(offset, length)
        if length == 0:
            return
        bs = self._block_size
        with self.lock:
            view = self._view
            changes: dict[int, bytes | None] = {}
            new_blocks: list[tuple[bytes, bytes]] = []
            for index in range(offset // bs, (offset + length - 1) // bs + 1):
                start = index * bs
                block_len = self.block_length(index)
                a = max(offset, start) - start
                b = min(offset + length, start + block_len) - start
                if zeros and a == 0 and b == block_len:
                    target = self._target_for_zeros(view, index, block_len)
                    block = b""
                else:
                    new = piece(start + a, start + b)
                    if a == 0 and b == block_len:
                        block = new
                    else:
                        old = self._block(view, index)
                        block = old[:a] + new + old[b:]
                    target = self._target(view, index, block)
                if view.entries.get(index) == target:
                    continue
                changes[index] = target
                if target is not None and block and not reads_as_zeros(target, block_len):
                    new_blocks.append((target, block))
                    self._remember(target, block)
            if changes:
                try:
                    working.apply(changes, new_blocks)
                except OutOfSpace as err:
                    raise OSError(errno.ENOSPC, str(err)) from err

    def _target(self, view: _View, index: int, block: bytes) -> bytes | None:
        """The working entry for a new block: None where the layers below already hold it."""
        if is_hole(block):
            return self._target_for_zeros(view, index, len(block))
        digest = block_digest(block)
        lower = view.lower_digest(index)
        if lower == COMPOSED:  # no id to compare: the bytes below are (rewriting a file system
            # image over its own layer must not copy it into the user's layer)
            return None if self._lower_block(index) == block else digest
        return None if digest == lower else digest

    def _target_for_zeros(self, view: _View, index: int, length: int) -> bytes | None:
        lower = view.lower_digest(index)
        if lower == COMPOSED:
            return None if is_hole(self._lower_block(index)) else zero_marker(length)
        return None if reads_as_zeros(lower, length) else zero_marker(length)

    def _lower_block(self, index: int) -> bytes:
        """The bytes the layers below hold at a COMPOSED block, read piece by piece."""
        assert self._pieces is not None
        block = bytearray(self.block_length(index))
        self._fill_pieces(self._pieces, index * self._block_size, memoryview(block), False)
        return bytes(block)

    # -- snapshots (cachepoint/disk/snapshot.py) ------------------------------------------------

    def below_user(self) -> bytes:
        """Packed digests of the layers under the user layer (HOLE_DIGEST where none has data)."""
        stack = self.stack[:-1] if self.user_base else self.stack
        if not stack:
            return HOLE_DIGEST * self.block_count
        placed = composite_disks(stack)
        blocks = self._on_grid(placed, _pieces_of(placed))
        return blocks + HOLE_DIGEST * (self.block_count - len(blocks) // DIGEST_SIZE)

    def top_entry(self) -> FileEntry:
        return self.stack[-1][1].entries[0]

    def rebase(self, info: VersionInfo, manifest: Manifest) -> None:
        """The user layer moved to ``info`` holding every working change: show it, with an empty
        working map (call with ``lock`` held, after the commit that cleared the stored map)."""
        assert self.working is not None
        stack = self.stack[:-1] if self.user_base else list(self.stack)
        stack.append((info, manifest))
        placed = composite_disks(stack)
        self._pieces = _pieces_of(placed)
        lower = self._on_grid(placed, self._pieces)
        self.stack = stack
        self._view = _View.of(lower, self.working.reset(info.number), self._size, self._block_size)


def _pieces_of(placed: PlacedFile) -> Pieces | None:
    """The pieces of a composited disk: its own, those of a content-chunked layer alone (its chunks
    where they lie), or None for layers on one grid."""
    if placed.pieces is None and placed.entry.chunked:
        return Pieces.compose([(placed.entry, placed.block_size)])
    return placed.pieces
