"""A disk image composed at extent level: which bytes of which block lie at each offset.

Layers cut on one fixed grid composite block by block (cachepoint/layers/composite.py). A
content-chunked layer has no grid: its chunks start and end wherever the content says (on 4 KiB
units), so a fixed block of an upper layer (an app layer, the user's layer) covers part of a chunk
and the rest of that chunk still shows. Such a stack is a list of pieces: ``[start, end)`` of the
disk reads bytes ``[skip, skip + end - start)`` of block ``digest``; where no piece lies, no layer
has data and the disk reads zeros.

Composition is one merge per layer, lowest first: each upper layer's data runs cut away what they
cover of the pieces below (a piece cut at its start keeps reading its block further on: its skip
grows). Readers find the pieces under a range by binary search, as for an extent index.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from cachepoint.blocks import zeros
from cachepoint.blocksource import BlockSource
from cachepoint.errors import BlockMissing
from cachepoint.ids import HOLE_DIGEST, BlockId
from cachepoint.model import FileEntry

# (start, end, digest, skip): bytes [start, end) of the disk are bytes [skip, skip + end - start) of
# the block ``digest``.
Piece = tuple[int, int, bytes, int]


def data_runs(entry: FileEntry, block_size: int) -> list[Piece]:
    """The pieces of one layer alone: each of its stored blocks or chunks where it lies."""
    runs: list[Piece] = []
    for index, digest in enumerate(entry.digests()):
        if digest == HOLE_DIGEST:
            continue
        start, end = entry.span(index, block_size)
        if end > start:
            runs.append((start, end, digest, 0))
    return runs


def overlay(below: list[Piece], above: list[Piece]) -> list[Piece]:
    """``above``'s runs over ``below``'s pieces (both sorted and without overlaps): one merge."""
    out: list[Piece] = []
    at = 0

    def next_below() -> Piece | None:
        nonlocal at
        if at < len(below):
            at += 1
            return below[at - 1]
        return None

    pending = next_below()
    for run in above:
        start, end = run[0], run[1]
        while pending is not None and pending[1] <= start:  # wholly before the run: kept
            out.append(pending)
            pending = next_below()
        if pending is not None and pending[0] < start:  # its head shows before the run
            out.append((pending[0], start, pending[2], pending[3]))
        out.append(run)
        while pending is not None and pending[1] <= end:  # wholly under the run: hidden
            pending = next_below()
        if pending is not None and pending[0] < end:  # its tail shows after the run
            s, e, digest, skip = pending
            pending = (end, e, digest, skip + (end - s))
    if pending is not None:
        out.append(pending)
    out.extend(below[at:])
    return out


@dataclass(frozen=True)
class Pieces:
    """A composed disk: sorted pieces, and its size (bytes past the last piece read as zeros).
    ``lengths``: each block's whole length, so a reader can tell a whole block from a piece of one."""

    size: int
    starts: list[int]
    ends: list[int]
    digests: list[bytes]
    skips: list[int]
    lengths: dict[bytes, int]

    @classmethod
    def compose(cls, layers: Sequence[tuple[FileEntry, int]]) -> Pieces:
        """The pieces of a stack of disk layers, lowest first: (entry, block size) each."""
        pieces: list[Piece] = []
        lengths: dict[bytes, int] = {}
        size = 0
        for entry, block_size in layers:
            size = max(size, entry.size)
            runs = data_runs(entry, block_size)
            lengths.update((digest, end - start) for start, end, digest, _ in runs)
            pieces = overlay(pieces, runs) if pieces else runs
        return cls(
            size,
            [p[0] for p in pieces],
            [p[1] for p in pieces],
            [p[2] for p in pieces],
            [p[3] for p in pieces],
            lengths,
        )

    def __len__(self) -> int:
        return len(self.starts)

    def between(self, offset: int, stop: int) -> range:
        """Indexes of the pieces that hold any of bytes [offset, stop)."""
        first = bisect.bisect_right(self.ends, offset)
        last = bisect.bisect_left(self.starts, stop)
        return range(first, max(first, last))

    def piece(self, index: int) -> Piece:
        return self.starts[index], self.ends[index], self.digests[index], self.skips[index]

    def whole(self, index: int) -> bool:
        """Whether piece ``index`` is all of its block (nothing above cut into it)."""
        length = self.ends[index] - self.starts[index]
        return not self.skips[index] and length == self.lengths[self.digests[index]]

    def on_grid(self, block_size: int, composed: bytes) -> bytes:
        """The packed id of each ``block_size`` block of the disk: a block that is one whole block
        of a layer has that block's id, one no piece touches HOLE_DIGEST, and any other (pieces of
        blocks, or data and zeros) ``composed``: a reader then reads it piece by piece."""
        size = len(composed)
        count = -(-self.size // block_size)
        grid = bytearray(HOLE_DIGEST * count)
        for index in range(len(self.starts)):
            start, end = self.starts[index], self.ends[index]
            first, last = start // block_size, (end - 1) // block_size
            block_end = min(self.size, (first + 1) * block_size)
            if first == last and start == first * block_size and end == block_end and self.whole(index):
                grid[first * size : (first + 1) * size] = self.digests[index]
                continue
            for block in range(first, last + 1):
                grid[block * size : (block + 1) * size] = composed
        return bytes(grid)

    def zero_runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """Runs from ``offset`` as (bytes, reads as zeros): a gap between pieces is zeros."""
        runs: list[tuple[int, bool]] = []
        pos, stop = offset, offset + length
        for index in self.between(offset, stop):
            start, end = self.starts[index], self.ends[index]
            if start > pos:
                if not add_run(runs, start - pos, True, limit):
                    return runs
                pos = start
            step = min(end, stop) - pos
            if not add_run(runs, step, False, limit):
                return runs
            pos += step
        if pos < stop:
            add_run(runs, stop - pos, True, limit)
        return runs

    def read_into(
        self,
        source: BlockSource,
        offset: int,
        out: memoryview,
        *,
        nowait: bool = False,
        also: Sequence[bytes] = (),
        zeroed: bool = True,
    ) -> bool:
        """Copy bytes [offset, offset + len(out)) into ``out``; where no piece lies it reads as zeros,
        which a zero-filled ``out`` (``zeroed``: a new buffer) already holds and others are given.
        A piece that starts at the start of its block is copied straight into
        place; one that reads from further in goes through a scratch copy of its block's head.
        ``nowait``: False, with ``out`` partly filled, as soon as a block is not in memory. Raises
        BlockMissing naming a block the source cannot give."""
        stop = offset + len(out)
        targets: list[tuple[bytes, memoryview]] = []
        scratch: list[tuple[memoryview, bytearray, int]] = []  # (where, block head, skip)
        done = offset  # with ``zeroed`` False: bytes before this are written or planned
        for index in self.between(offset, stop):
            start, end, digest, skip = self.piece(index)
            lo, hi = max(start, offset), min(end, stop)
            if not zeroed and lo > done:
                out[done - offset : lo - offset] = zeros(lo - done)
            done = hi
            skip += lo - start
            where = out[lo - offset : hi - offset]
            if skip == 0:
                targets.append((digest, where))
            else:
                head = bytearray(skip + (hi - lo))
                scratch.append((where, head, skip))
                targets.append((digest, memoryview(head)))
        if not zeroed and done < stop:
            out[done - offset :] = zeros(stop - done)
        if not targets:
            return True
        if nowait and not source.holds_all([digest for digest, _ in targets]):
            return False  # asked before copying: the caller's read without ``nowait`` copies them all
        missing = source.read_into(targets, nowait=nowait, also=also)
        if missing:
            if nowait:
                return False
            raise BlockMissing(BlockId(targets[missing[0]][0]))
        for where, head, skip in scratch:
            where[:] = memoryview(head)[skip:]
        return True


def add_run(runs: list[tuple[int, bool]], step: int, zeros: bool, limit: int) -> bool:
    """Extend the last (length, zeros) run, or start a new one; False when ``limit`` runs are full."""
    if runs and runs[-1][1] == zeros:
        runs[-1] = (runs[-1][0] + step, zeros)
    elif len(runs) == limit:
        return False
    else:
        runs.append((step, zeros))
    return True
