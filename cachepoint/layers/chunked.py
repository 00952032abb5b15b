"""Ingest of one disk image in content-aligned chunks (cachepoint/chunking.py).

The calling thread reads the image in JOB_BYTES windows and cuts them (one xxh3-64 per unit: it holds
the GIL, ~0.3 us per 4 KiB) while worker threads take each window's chunks: the pre-filter, SHA-256
and zstd, which release the GIL. The calling thread stays the single RocksDB writer.

Pre-filter: a chunk the previous version had at the same offset with the same length and the same
seeded xxh3-128 is that chunk again: no SHA-256, no lookup, no store (the record is the one fixed
blocks use, 16 bytes per block of the manifest, so rollback, GC and catalog code see no difference).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from cachepoint.blocks import encode_block
from cachepoint.chunking import ChunkParams, Extent, cut, ends_by_content, zero_units
from cachepoint.errors import SourceUnreadable
from cachepoint.ids import HOLE_DIGEST
from cachepoint.layers.source import SourceFile
from cachepoint.model import FileEntry, pack_extents
from cachepoint.store import format as fmt
from cachepoint.store.store import IngestPins, Store

JOB_BYTES = 4 * 1024 * 1024
XXH_SIZE = fmt.PREFILTER_DIGEST_SIZE
NO_XXH = bytes(XXH_SIZE)

# A chunk the previous version had, by its start: (end, seeded xxh3-128, id).
PreviousChunks = dict[int, tuple[int, bytes, bytes]]


def previous_chunks(entry: FileEntry, block_size: int, record: bytes | None) -> PreviousChunks:
    """The previous version's chunks by start, from its entry and its pre-filter record."""
    if not record or len(record) != entry.block_count * XXH_SIZE:
        return {}
    found: PreviousChunks = {}
    for index in range(entry.block_count):
        digest = entry.digest_at(index)
        if digest == HOLE_DIGEST:
            continue
        start, end = entry.span(index, block_size)
        found[start] = (end, record[index * XXH_SIZE : (index + 1) * XXH_SIZE], digest)
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


@dataclass
class _Chunk:
    start: int
    data: bytes
    digest: bytes = b""
    xxh: bytes = b""
    value: bytes | None = None  # the stored value when the store lacks the chunk
    reused: bool = False


@dataclass
class _Window:
    extents: list[Extent]
    chunks: list[_Chunk] = field(default_factory=list)


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
        by_start = {c.start: c for c in window.chunks}
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
            append(start + length, by_start[start])
        if progress is not None and ends:
            progress(ends[-1], source.size)

    try:
        if source.identity is not None:
            st = os.fstat(fd)
            if (st.st_ino, st.st_dev) != source.identity:
                raise SourceUnreadable(source.disk_path, "it was replaced by another file while being read")
        with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
            inflight: deque[Future[_Window]] = deque()
            carry = b""
            base = 0  # file offset of carry's first byte
            pos = 0
            size = source.size
            while pos < size:
                length = min(JOB_BYTES, size - pos)
                final = pos + length >= size
                if not carry and _all_hole(fd, pos, length):
                    window = _Window([(pos, length, True)])
                    base = pos + length
                else:
                    data = os.pread(fd, length, pos)
                    if len(data) != length:
                        raise SourceUnreadable(source.disk_path, "the file shrank while it was being read")
                    out.bytes_read += length
                    if pos == 0:
                        out.head = data[:16]
                    buf = carry + data if carry else data
                    window, used = _cut_window(buf, base, params, final, previous, hasher.seed)
                    carry = buf[used:]
                    base += used
                pos += length
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
    buf: bytes, base: int, params: ChunkParams, final: bool, previous: PreviousChunks, seed: int
) -> tuple[_Window, int]:
    """Cut one window. At each chunk start where the previous version had a chunk whose bytes are
    the same (seeded xxh3-128 over the whole chunk: one call instead of one per unit) and whose end
    the content decides, that chunk is taken whole: a re-ingest of unchanged data costs one xxh3
    pass, as with fixed blocks. Elsewhere units are cut one by one until the next such start."""
    window = _Window([])
    view = memoryview(buf)
    pos, n = 0, len(buf)
    zeros = zero_units(buf, 0, n // params.unit * params.unit, params.unit) if previous else None
    while pos < n:
        before = previous.get(base + pos)
        if before is not None:
            end = before[0] - base
            piece = view[pos:end]
            if (
                end <= n
                and xxhash.xxh3_128_digest(piece, seed=seed) == before[1]
                and ends_by_content(piece, params)
            ):
                window.extents.append((base + pos, end - pos, False))
                window.chunks.append(_Chunk(base + pos, b"", before[2], before[1], reused=True))
                pos = end
                continue
        extents, used = cut(buf, base, params, final, begin=pos, stop_at=previous, zeros=zeros)
        for start, span, empty in extents:
            window.extents.append((start, span, empty))
            if not empty:
                window.chunks.append(_Chunk(start, buf[start - base : start - base + span]))
        if used == pos:  # nothing more can be cut in this window (an unfinished chunk is carried)
            break
        pos = used
        if not extents or (used < n and base + used not in previous):
            break
    return window, pos


def _all_hole(fd: int, start: int, length: int) -> bool:
    """Whether bytes [start, start+length) lie in a hole of a sparse file (nothing to read)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= start + length
    except OSError:
        return False  # ENXIO means "only holes from here" but also happens past EOF: read and see
