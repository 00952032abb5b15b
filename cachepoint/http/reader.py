"""The data path: the bytes of a byte range of a file, read from a block source block by block.

Only the blocks a range covers are read, ~1 MiB at a time (one source call and one socket write:
PERF-CEILINGS §5 measured 1 MiB writes at the loop's ceiling). What the source holds in memory (the
daemon's decoded cache) is copied on the event loop; the rest is read and decoded in a worker
thread (RocksDB reads and zstd release the GIL), and the next spans are read while the current one
is written. Holes are zeros and never touch the source.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Iterator

from cachepoint.blocks import zeros
from cachepoint.blocksource import BlockSource, Target
from cachepoint.errors import BlockMissing
from cachepoint.http.ranges import ByteRange
from cachepoint.ids import HOLE_DIGEST, BlockId
from cachepoint.layers.export import PlacedFile

CHUNK_BYTES = 1024 * 1024
# Spans read in worker threads while the current one is written. At least 1; costs (READ_AHEAD + 1)
# MiB per response in flight.
READ_AHEAD = 2


def spans(placed: PlacedFile, wanted: ByteRange) -> Iterator[ByteRange]:
    """Split a range into spans of CHUNK_BYTES (or one block, for blocks larger than that) that end on
    block boundaries, so no block is read twice."""
    entry, bs = placed.entry, placed.block_size
    if placed.pieces is not None:  # pieces are cut to any span: no edge to keep
        bs = 1
    step = max(1, CHUNK_BYTES // bs) * bs
    pos = wanted.start
    while pos < wanted.stop:
        end = min(wanted.stop, (pos // step + 1) * step)
        if entry.chunked and end < wanted.stop:
            # Variable chunks: end where the chunk under ``end`` starts, or after it when it started
            # before ``pos`` (chunks are at most block_size <= step long). Holes may be read twice.
            index = entry.block_at(end, bs)
            if index < entry.block_count and _digest(placed, index) != HOLE_DIGEST:
                start, stop = entry.span(index, bs)
                end = start if start > pos else min(wanted.stop, stop)
        yield ByteRange(pos, end)
        pos = end


def _digest(placed: PlacedFile, index: int) -> bytes:
    # A manifest whose ids end before its size reads as zeros there, as an export's ftruncate makes it.
    return placed.entry.digest_at(index) or HOLE_DIGEST


def is_all_holes(placed: PlacedFile, span: ByteRange) -> bool:
    if placed.pieces is not None:
        return not placed.pieces.between(span.start, span.stop)
    blocks = placed.entry.blocks_between(span.start, span.stop, placed.block_size)
    return all(_digest(placed, i) == HOLE_DIGEST for i in blocks)


def blocks_in(placed: PlacedFile, span: ByteRange) -> list[tuple[int, int, bytes]]:
    """(offset, length, id) of each stored block the span touches, in order: the one place that
    finds blocks by offset (fixed blocks or the extent index of content chunks)."""
    entry, bs = placed.entry, placed.block_size
    found = []
    for index in entry.blocks_between(span.start, span.stop, bs):
        digest = _digest(placed, index)
        if digest != HOLE_DIGEST:
            start, end = entry.span(index, bs)
            found.append((start, end - start, digest))
    return found


class _Span:
    """A buffer over the whole blocks a span touches (zero-filled: holes, and bytes past a block's
    end, need no work), and where each stored block goes in it."""

    def __init__(self, placed: PlacedFile, span: ByteRange) -> None:
        blocks = blocks_in(placed, span)
        self.base = min(span.start, blocks[0][0]) if blocks else span.start
        end = max(span.stop, blocks[-1][0] + blocks[-1][1]) if blocks else span.stop
        self.span = span
        self.buffer = bytearray(end - self.base)
        view = memoryview(self.buffer)
        self.wanted: list[Target] = [
            (digest, view[offset - self.base : offset - self.base + length])
            for offset, length, digest in blocks
        ]

    def bytes(self) -> memoryview:
        return memoryview(self.buffer)[self.span.start - self.base : self.span.stop - self.base]


def _fill(source: BlockSource, wanted: list[Target]) -> None:
    missing = source.read_into(wanted)
    if missing:
        raise BlockMissing(BlockId(wanted[missing[0]][0]))


def read_span(source: BlockSource, placed: PlacedFile, span: ByteRange) -> bytes | bytearray | memoryview:
    """The bytes of one span. Blocking: run in a thread.

    Raises BlockMissing, BlockCorrupt or BlockUnreadable naming the block."""
    if placed.pieces is not None:
        buffer = bytearray(span.length)
        placed.pieces.read_into(source, span.start, memoryview(buffer))
        return buffer
    out = _Span(placed, span)
    _fill(source, out.wanted)
    return out.bytes()


async def _read(source: BlockSource, placed: PlacedFile, span: ByteRange) -> bytes | bytearray | memoryview:
    if is_all_holes(placed, span):
        # One shared buffer for the common case; a span of one block larger than it gets its own.
        return zeros(span.length)
    if placed.pieces is not None:  # a stack with content-chunked layers (cachepoint/layers/pieces.py)
        buffer = bytearray(span.length)
        if not placed.pieces.read_into(source, span.start, memoryview(buffer), nowait=True):
            await asyncio.to_thread(placed.pieces.read_into, source, span.start, memoryview(buffer))
        return buffer
    out = _Span(placed, span)
    # What the cache holds in memory costs a copy here, and no thread switch.
    cold = source.read_into(out.wanted, nowait=True)
    if cold:
        await asyncio.to_thread(_fill, source, [out.wanted[position] for position in cold])
    return out.bytes()


def _retrieve(task: asyncio.Task[bytes | bytearray | memoryview]) -> None:
    # A read-ahead abandoned because the response stopped may still fail later; fetch its
    # exception so asyncio does not report it as never retrieved.
    if not task.cancelled():
        task.exception()


async def read_range(
    source: BlockSource, placed: PlacedFile, wanted: ByteRange
) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    """The bytes of ``wanted`` in chunks of ~CHUNK_BYTES, reading READ_AHEAD spans ahead of the consumer.

    ``aclose()`` it when stopping early, so the reads ahead are cancelled."""
    pending = iter(spans(placed, wanted))
    reads: deque[asyncio.Task[bytes | bytearray | memoryview]] = deque()

    def fill() -> None:
        while len(reads) < READ_AHEAD:
            span = next(pending, None)
            if span is None:
                return
            task = asyncio.ensure_future(_read(source, placed, span))
            task.add_done_callback(_retrieve)
            reads.append(task)

    try:
        fill()
        while reads:
            chunk = await reads[0]
            reads.popleft()
            fill()
            yield chunk
    finally:
        for task in reads:
            task.cancel()
