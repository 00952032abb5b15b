"""The data path: the bytes of a byte range of a file, read from the store block by block.

Only the blocks a range covers are read, ~1 MiB at a time (one raw_many batch and one socket write:
PERF-CEILINGS §5 measured 1 MiB writes at the loop's ceiling). Fetching and verifying run in a
worker thread (RocksDB reads, zstd and SHA-256 release the GIL), and the next spans are fetched
while the current one is written. Holes are zeros and never touch the store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Iterator

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockMissing
from cachepoint.http.ranges import ByteRange
from cachepoint.ids import HOLE_DIGEST, BlockId
from cachepoint.layers.export import PlacedFile
from cachepoint.store.store import Store

CHUNK_BYTES = 1024 * 1024
# Spans read (and verified) in worker threads while the current one is written: SHA-256 runs at
# ~2 GB/s per core, below the ~4 GB/s a loopback socket takes, so verifying takes more than one core.
# At least 1; costs (READ_AHEAD + 1) MiB per response in flight.
READ_AHEAD = 2
_ZEROS = memoryview(bytes(CHUNK_BYTES))


def spans(placed: PlacedFile, wanted: ByteRange) -> Iterator[ByteRange]:
    """Split a range into spans of CHUNK_BYTES (or one block, for blocks larger than that) that end on
    block boundaries, so no block is read twice."""
    entry, bs = placed.entry, placed.block_size
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
    blocks = placed.entry.blocks_between(span.start, span.stop, placed.block_size)
    return all(_digest(placed, i) == HOLE_DIGEST for i in blocks)


def read_span(store: Store, placed: PlacedFile, span: ByteRange) -> bytearray:
    """The bytes of one span, every stored block verified against its id. Blocking: run in a thread.

    Raises BlockMissing, BlockCorrupt or BlockUnreadable naming the block."""
    entry, bs = placed.entry, placed.block_size
    indices = entry.blocks_between(span.start, span.stop, bs)
    stored = [(i, d) for i in indices if (d := _digest(placed, i)) != HOLE_DIGEST]
    values = store.blocks.raw_many([d for _, d in stored])
    out = bytearray(span.length)  # zero-filled: holes, and the tail of a short block, need no work
    for (index, digest), value in zip(stored, values, strict=True):
        if value is None:
            raise BlockMissing(BlockId(digest))
        data = memoryview(decode_verified(digest, value))
        # A block shorter than the block size (a layer's last block under a larger composite) is
        # followed by zeros, as export's pwrite into an ftruncated file leaves it.
        offset = entry.span(index, bs)[0]
        lo, hi = max(span.start, offset), min(span.stop, offset + len(data))
        if lo < hi:
            out[lo - span.start : hi - span.start] = data[lo - offset : hi - offset]
    return out


async def _read(store: Store, placed: PlacedFile, span: ByteRange) -> bytes | bytearray | memoryview:
    if is_all_holes(placed, span):
        # One shared buffer for the common case; a span of one block larger than it gets its own.
        return _ZEROS[: span.length] if span.length <= len(_ZEROS) else bytes(span.length)
    return await asyncio.to_thread(read_span, store, placed, span)


def _retrieve(task: asyncio.Task[bytes | bytearray | memoryview]) -> None:
    # A read-ahead abandoned because the response stopped may still fail later; fetch its
    # exception so asyncio does not report it as never retrieved.
    if not task.cancelled():
        task.exception()


async def read_range(
    store: Store, placed: PlacedFile, wanted: ByteRange
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
            task = asyncio.ensure_future(_read(store, placed, span))
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
