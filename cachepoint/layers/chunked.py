"""Ingest of one disk image in content-aligned chunks (cachepoint/chunking.py).

A reader thread fills JOB_BYTES windows of the image ahead of the calling thread, which cuts them
(one xxh3-64 per unit: it holds the GIL, ~0.3 us per 4 KiB) while worker threads take each window's
chunks: the pre-filter, SHA-256 and zstd, which release the GIL. The calling thread stays the single
RocksDB writer.

Windows are anonymous mmap buffers, reused once their chunks are stored, and chunks are views into
them: the image's bytes are copied once, by the kernel, and a run of windows costs no page faults
(reading into freshly allocated bytes, or into a bytearray, took ~3x the CPU of reading into mmap
memory on the benchmark machine). The unfinished chunk at a window's end is copied into the room
kept before the next window's bytes.

Pre-filter: a chunk the previous version had at the same offset with the same length and the same
seeded xxh3-128 is that chunk again: no SHA-256, no lookup, no store (the record is the one fixed
blocks use, 16 bytes per block of the manifest, so rollback, GC and catalog code see no difference).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from cachepoint.blocks import encode_block
from cachepoint.chunking import ChunkParams, Extent, cut, zero_units
from cachepoint.errors import SourceUnreadable
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST
from cachepoint.layers.source import SourceFile, all_hole
from cachepoint.model import FileEntry, pack_extents
from cachepoint.store import format as fmt
from cachepoint.store.store import IngestPins, Store

JOB_BYTES = 4 * 1024 * 1024
READ_AHEAD = 2  # windows being read while the calling thread cuts one
XXH_SIZE = fmt.PREFILTER_DIGEST_SIZE
NO_XXH = bytes(XXH_SIZE)

# A chunk the previous version had, by its start: (end, seeded xxh3-128, id).
PreviousChunks = dict[int, tuple[int, bytes, bytes]]


def previous_chunks(entry: FileEntry, block_size: int, record: bytes | None) -> PreviousChunks:
    """The previous version's chunks by start, from its entry and its pre-filter record."""
    if not record or len(record) != entry.block_count * XXH_SIZE:
        return {}
    found: PreviousChunks = {}
    blocks = entry.blocks
    count = entry.block_count
    ends = entry.ends() if entry.extents else [entry.span(i, block_size)[1] for i in range(count)]
    start = 0
    for index, end in enumerate(ends[:count]):
        digest = blocks[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        if digest != HOLE_DIGEST:
            found[start] = (end, record[index * XXH_SIZE : (index + 1) * XXH_SIZE], digest)
        start = end
    return found


@dataclass
class ContentCut:
    """One file cut into content-aligned chunks: its manifest fields and what the cut did."""

    blocks: bytes = b""
    extents: bytes = b""
    prefilter: bytes = b""
    head: bytes = b""
    chunks: int = 0
    holes: int = 0
    reused: int = 0
    deduplicated: int = 0
    new_blocks: int = 0
    new_bytes: int = 0
    new_stored_bytes: int = 0
    bytes_read: int = 0


@dataclass(slots=True)
class _Chunk:
    start: int
    data: memoryview | bytes  # a view into its window's buffer, valid until the window is consumed
    digest: bytes = b""
    xxh: bytes = b""
    value: bytes | None = None  # the stored value when the store lacks the chunk
    reused: bool = False


@dataclass(slots=True)
class _Window:
    extents: list[Extent]
    chunks: list[_Chunk] = field(default_factory=list)
    buffer: mmap.mmap | None = None  # back to the pool once the window is consumed


class _Hasher:
    def __init__(self, store: Store, pins: IngestPins, previous: PreviousChunks) -> None:
        self.store, self.pins, self.previous = store, pins, previous
        self.seed = store.prefilter_seed

    def process(self, window: _Window) -> _Window:  # on a worker thread
        pinned: list[bytes] = []
        candidates: list[_Chunk] = []
        for chunk in window.chunks:
            if chunk.reused:  # taken whole from the previous version by the cut (``_cut_window``)
                pinned.append(chunk.digest)
                continue
            chunk.xxh = xxhash.xxh3_128_digest(chunk.data, seed=self.seed)
            before = self.previous.get(chunk.start)
            if before is not None and before[0] == chunk.start + len(chunk.data) and before[1] == chunk.xxh:
                chunk.digest, chunk.reused = before[2], True
            else:
                chunk.digest = hashlib.sha256(chunk.data).digest()
                candidates.append(chunk)
            pinned.append(chunk.digest)
        # Pinned before asking the store, as the fixed-block pipeline does (GC runs under the same lock).
        self.store.pin(self.pins, pinned)
        for chunk in candidates:
            if not self.store.blocks.has(chunk.digest):
                chunk.value = encode_block(chunk.data)
        return window


def cut_content(
    store: Store,
    source: SourceFile,
    params: ChunkParams,
    pins: IngestPins,
    previous: PreviousChunks,
    workers: int,
    progress: Callable[[int, int], None] | None = None,
) -> ContentCut:
    """Cut one file into content-aligned chunks and store the new ones (not yet persisted: the
    caller persists, then commits)."""
    out = ContentCut()
    hasher = _Hasher(store, pins, previous)
    digests, ends, xxhs = bytearray(), [], bytearray()
    written: set[bytes] = set()
    flags = os.O_RDONLY if source.identity is None else os.O_RDONLY | os.O_NOFOLLOW
    try:
        fd = os.open(source.disk_path, flags)
    except OSError as err:
        raise SourceUnreadable(source.disk_path, err.strerror or str(err)) from err
    hole: list[int] = []  # [start, length] of a run of holes not yet recorded: it may go on
    # Room before each window's bytes for the unfinished chunk the previous window leaves (it is
    # shorter than max_length): copied there, never read again.
    room = params.max_length
    job = JOB_BYTES
    buffers: list[mmap.mmap] = []

    def append(end: int, chunk: _Chunk | None) -> None:
        if chunk is None:
            digests.extend(HOLE_DIGEST)
            xxhs.extend(NO_XXH)
            out.holes += 1
        else:
            digests.extend(chunk.digest)
            xxhs.extend(chunk.xxh)
            out.chunks += 1
        ends.append(end)

    def consume(window: _Window) -> None:
        values = []
        for chunk in window.chunks:
            if chunk.reused:
                out.reused += 1
            elif chunk.value is None or chunk.digest in written:
                out.deduplicated += 1
            else:
                written.add(chunk.digest)
                values.append((chunk.digest, chunk.value))
                out.new_blocks += 1
                out.new_bytes += len(chunk.data)
                out.new_stored_bytes += len(chunk.value)
        if values:
            store.blocks.put_many(values)
        chunks = iter(window.chunks)  # one per extent that is not a hole, in the same order
        for start, length, is_hole in window.extents:
            if is_hole:
                if hole:
                    hole[1] += length
                else:
                    hole[:] = [start, length]
                continue
            if hole:
                append(hole[0] + hole[1], None)
                hole.clear()
            append(start + length, next(chunks))
        if window.buffer is not None:
            window.chunks.clear()
            buffers.append(window.buffer)
        if progress is not None and ends:
            progress(ends[-1], source.size)

    def read(buffer: mmap.mmap, pos: int, length: int, need: bool) -> bool:
        """Fill ``buffer`` after its room with bytes [pos, pos+length) of the file; False (nothing
        read) when they all lie in a hole of a sparse file, unless ``need``."""
        if not need and all_hole(fd, pos, length):
            return False
        got = os.preadv(fd, [memoryview(buffer)[room : room + length]], pos)
        if got != length:
            raise SourceUnreadable(source.disk_path, "the file shrank while it was being read")
        return True

    try:
        if source.identity is not None:
            st = os.fstat(fd)
            if (st.st_ino, st.st_dev) != source.identity:
                raise SourceUnreadable(source.disk_path, "it was replaced by another file while being read")
        size = source.size
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="ingest-read") as reader,
        ):
            inflight: deque[Future[_Window]] = deque()
            reads: deque[tuple[int, int, mmap.mmap, Future[bool]]] = deque()
            next_read = 0

            def read_ahead() -> None:
                nonlocal next_read
                while len(reads) < READ_AHEAD and next_read < size:
                    length = min(job, size - next_read)
                    buffer = buffers.pop() if buffers else mmap.mmap(-1, room + job)
                    filled = reader.submit(read, buffer, next_read, length, False)
                    reads.append((next_read, length, buffer, filled))
                    next_read += length

            carry = b""  # the unfinished chunk at the end of the previous window
            read_ahead()
            while reads:
                pos, length, buffer, filled = reads.popleft()
                final = pos + length >= size
                has_data = filled.result()
                read_ahead()
                if not has_data and not carry:
                    buffers.append(buffer)
                    window = _Window([(pos, length, True)])
                else:
                    if not has_data:  # zeros of a hole that the unfinished chunk before it runs into
                        read(buffer, pos, length, True)
                    out.bytes_read += length
                    if pos == 0:
                        out.head = buffer[room : room + min(16, length)]
                    begin = room - len(carry)
                    buffer[begin:room] = carry
                    data: bytes | mmap.mmap = buffer
                    if room + length < len(buffer):  # the last window: the cut takes the data's length
                        data, begin = buffer[begin : room + length], 0
                    start = pos - len(carry) - begin  # the file offset of data[0]
                    window, used = _cut_window(data, start, begin, params, final, previous, hasher.seed)
                    window.buffer = buffer
                    carry = data[used:]
                inflight.append(pool.submit(hasher.process, window))
                if len(inflight) > workers * 2:
                    consume(inflight.popleft().result())
            while inflight:
                consume(inflight.popleft().result())
            if hole:
                append(hole[0] + hole[1], None)
    finally:
        os.close(fd)
    if source.size and not out.head:
        out.head = bytes(min(16, source.size))
    out.blocks = bytes(digests)
    out.extents = pack_extents(ends)
    out.prefilter = bytes(xxhs)
    return out


def _cut_window(
    data: bytes | mmap.mmap,
    base: int,
    begin: int,
    params: ChunkParams,
    final: bool,
    previous: PreviousChunks,
    seed: int,
) -> tuple[_Window, int]:
    """Cut one window: ``data`` from index ``begin`` (``data`` starts at file offset ``base``). At
    each chunk start where the previous version had a chunk whose bytes are the same (seeded
    xxh3-128 over the whole chunk: one call instead of one per unit) and whose end the content
    decides, that chunk is taken whole: a re-ingest of unchanged data costs one xxh3 pass, as with
    fixed blocks. Elsewhere units are cut one by one until the next such start."""
    window = _Window([])
    view = memoryview(data)
    pos, n = begin, len(data)
    zeros: list[int] | None = None  # found when a part of the window must be cut unit by unit
    unit, low, high, threshold = params.unit, params.min_length, params.max_length, params.threshold
    hash128, hash64 = xxhash.xxh3_128_digest, xxhash.xxh3_64_intdigest
    while pos < n:
        before = previous.get(base + pos)
        if before is not None:
            end = before[0] - base
            length = end - pos
            # The previous chunk, if it ended by content (see chunking.ends_by_content: long enough
            # and its last unit's hash says so, or as long as a chunk may be), not at a hole or an end.
            if (
                end <= n
                and not length % unit
                and low <= length <= high
                and hash128(view[pos:end], seed=seed) == before[1]
                and (length == high or hash64(view[end - unit : end]) < threshold)
            ):
                window.extents.append((base + pos, length, False))
                window.chunks.append(_Chunk(base + pos, b"", before[2], before[1], reused=True))
                pos = end
                continue
        if zeros is None:
            zeros = zero_units(data, pos, n // unit * unit, unit)
        extents, used = cut(data, base, params, final, begin=pos, stop_at=previous, zeros=zeros)
        for start, span, empty in extents:
            window.extents.append((start, span, empty))
            if not empty:
                window.chunks.append(_Chunk(start, view[start - base : start - base + span]))
        if used == pos:  # nothing more can be cut in this window (an unfinished chunk is carried)
            break
        pos = used
        if not extents or (used < n and base + used not in previous):
            break
    return window, pos
