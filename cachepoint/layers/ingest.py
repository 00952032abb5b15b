"""Ingest: cut a file or a tree into blocks, store the new ones, commit a version.

Pipeline: worker threads read ~4 MiB jobs, skip holes, xxh3 every block, reuse the previous version's
id where the xxh3 at the same offset matches (no SHA-256, no store), SHA-256 the rest, and compress
the blocks the store lacks (hashlib and zstd release the GIL, so two cores work). The calling
thread is the single RocksDB writer: blocks go in with the WAL off, are flushed once at the end, and
only then is the version committed (see store/format.py).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import xxhash

from cachepoint.blocks import DEFAULT_BLOCK_SIZE, encode_block, is_hole
from cachepoint.chunking import ChunkParams
from cachepoint.errors import InvalidBlockSize, InvalidInput, NotFound, SourceUnreadable
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST, Ref, validate_layer_name, validate_tag
from cachepoint.layers.chunked import cut_content, previous_chunks
from cachepoint.layers.source import SourceFile, SourceTree, all_hole, scan
from cachepoint.layers.unchanged import named_by_all, same_content, target_tags
from cachepoint.model import Chunking, EntryType, FileEntry, LayerKind, Manifest, VersionInfo
from cachepoint.store import format as fmt
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import IngestPins, Store
from cachepoint.wire import manifest_digest, manifest_to_bytes

JOB_BYTES = 4 * 1024 * 1024  # one job: enough work to amortise the hand-off, small enough to pipeline
PREFILTER_MIN_BLOCKS = 4  # smaller files re-hash faster than they look up a prefilter record
XXH_SIZE = fmt.PREFILTER_DIGEST_SIZE
HEAD_BYTES = 16  # the first bytes of each file read, kept for callers that classify files by magic
NO_XXH = bytes(XXH_SIZE)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class IngestOptions:
    layer: str
    kind: LayerKind = LayerKind.APP
    message: str = ""
    author: str = ""
    device: str = ""
    block_size: int | None = None  # None: the layer's own, or new_layer_block_size for a new layer
    new_layer_block_size: int = DEFAULT_BLOCK_SIZE
    # None: the layer's own, or new_layer_chunking for a new disk-image layer (trees are always FIXED).
    chunking: Chunking | None = None
    new_layer_chunking: Chunking = Chunking.FIXED
    chunk_params: ChunkParams = field(default_factory=ChunkParams)  # a new CONTENT layer's
    tags: tuple[str, ...] = ()
    workers: int = 0  # 0: one per core
    allow_same: bool = False  # False: no new version when the target tag already names this content


@dataclass
class IngestResult:
    version: VersionInfo | None = None
    logical_bytes: int = 0
    new_bytes: int = 0  # raw bytes of blocks this store did not have
    new_stored_bytes: int = 0  # what those blocks take at rest (after compression)
    blocks: int = 0
    holes: int = 0
    reused: int = 0  # unchanged since the previous version (xxh3 pre-filter): not hashed, not stored
    deduplicated: int = 0  # hashed, already in the store
    new_blocks: int = 0
    bytes_read: int = 0  # from the source files (holes of sparse files are not read)
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unchanged: bool = False  # ``version`` is the existing one its tag names: no version was made

    def as_json(self) -> dict[str, object]:
        v = self.version
        assert v is not None, "the ingest has not committed"
        return {
            "layer": v.layer,
            "version": v.number,
            "ref": v.ref,
            "digest": v.digest_text,
            "parent": v.parent or None,
            "unchanged": self.unchanged,
            "logical_bytes": self.logical_bytes,
            "new_bytes": self.new_bytes,
            "new_stored_bytes": self.new_stored_bytes,
            "blocks": self.blocks,
            "holes": self.holes,
            "reused_blocks": self.reused,
            "deduplicated_blocks": self.deduplicated,
            "new_blocks": self.new_blocks,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of blocks of one file, with what the previous version had at the same offsets."""

    file_index: int
    disk_path: str
    file_size: int
    first_block: int
    count: int
    prev_xxh: bytes  # XXH_SIZE per block, or b""
    prev_ids: bytes  # DIGEST_SIZE per block, or b""
    identity: tuple[int, int] | None = None  # see SourceFile.identity


@dataclass
class _SegmentResult:
    segment: _Segment
    digests: bytearray
    xxhs: bytearray
    new_values: list[tuple[bytes, bytes, int]]  # (digest, encoded value, raw size)
    holes: int = 0
    reused: int = 0
    deduplicated: int = 0
    bytes_read: int = 0
    head: bytes = b""  # the file's first bytes, for the segment that starts the file


def default_author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


class _Ingest:
    def __init__(self, store: Store, block_size: int, pins: IngestPins) -> None:
        self.store = store
        self.block_size = block_size
        self.pins = pins
        self.seed = store.prefilter_seed

    # Runs on worker threads.
    def process(self, segments: list[_Segment]) -> list[_SegmentResult]:
        return [self._process_segment(s) for s in segments]

    def _process_segment(self, seg: _Segment) -> _SegmentResult:
        bs = self.block_size
        result = _SegmentResult(seg, bytearray(seg.count * DIGEST_SIZE), bytearray(seg.count * XXH_SIZE), [])
        start = seg.first_block * bs
        length = min(seg.count * bs, seg.file_size - start)
        flags = os.O_RDONLY if seg.identity is None else os.O_RDONLY | os.O_NOFOLLOW
        try:
            fd = os.open(seg.disk_path, flags)
        except OSError as err:
            raise SourceUnreadable(seg.disk_path, err.strerror or str(err)) from err
        try:
            if seg.identity is not None:
                st = os.fstat(fd)
                if (st.st_ino, st.st_dev) != seg.identity:
                    raise SourceUnreadable(seg.disk_path, "it was replaced by another file while being read")
            data = self._read(fd, seg, start, length)
        finally:
            os.close(fd)
        if data is None:  # the whole run lies in a hole of a sparse file: nothing to read
            result.digests[:] = HOLE_DIGEST * seg.count
            result.holes = seg.count
            if seg.first_block == 0:
                result.head = bytes(min(HEAD_BYTES, length))
            return result
        result.bytes_read = length
        if seg.first_block == 0:
            result.head = data[:HEAD_BYTES]
        # bytes slices, not memoryviews: a slice costs a 64 KiB memcpy (~3 us), while comparing a
        # memoryview with bytes for the hole test goes element by element (~40 us).
        candidates: list[tuple[int, bytes, bytes]] = []
        pinned: list[bytes] = []
        xxh = xxhash.xxh3_128_digest
        for i in range(seg.count):
            block = data[i * bs : min((i + 1) * bs, length)]
            d0 = i * DIGEST_SIZE
            if is_hole(block):
                result.digests[d0 : d0 + DIGEST_SIZE] = HOLE_DIGEST
                result.holes += 1
                continue
            fast = xxh(block, seed=self.seed)
            result.xxhs[i * XXH_SIZE : (i + 1) * XXH_SIZE] = fast
            if seg.prev_xxh and seg.prev_xxh[i * XXH_SIZE : (i + 1) * XXH_SIZE] == fast:
                previous = seg.prev_ids[d0 : d0 + DIGEST_SIZE]
                if previous != HOLE_DIGEST:
                    result.digests[d0 : d0 + DIGEST_SIZE] = previous
                    result.reused += 1
                    pinned.append(previous)
                    continue
            digest = hashlib.sha256(block).digest()
            result.digests[d0 : d0 + DIGEST_SIZE] = digest
            candidates.append((i, digest, block))
            pinned.append(digest)
        # Pin before asking whether a block exists, so a GC in this process cannot remove it between
        # the answer and the commit (GC checks pins and deletes under the same lock).
        self.store.pin(self.pins, pinned)
        for _, digest, block in candidates:
            if self.store.blocks.has(digest):
                result.deduplicated += 1
            else:
                result.new_values.append((digest, encode_block(block), len(block)))
        return result

    def _read(self, fd: int, seg: _Segment, start: int, length: int) -> bytes | None:
        if all_hole(fd, start, length):
            return None
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise SourceUnreadable(seg.disk_path, "the file shrank while it was being ingested")
        return data


def _previous_for(store: Store, layer: str, block_size: int) -> tuple[Manifest | None, bytes]:
    record = store.catalog.layer_or_none(layer)
    if record is None:
        return None, b""
    info = store.catalog.version(layer, record.latest)
    if info.block_size != block_size:
        return None, b""
    return store.catalog.manifest(info.manifest_digest), info.manifest_digest


# The previous version's file at a path: its entry index there and its packed block ids.
PreviousFile = tuple[int, bytes]
PreviousLookup = Callable[[str], PreviousFile | None]


def _previous_files(prev: Manifest | None, entries: list[FileEntry]) -> PreviousLookup:
    """Where an ingest finds the previous version of each file: at the same path."""
    if prev is None:
        return lambda path: None
    files = {e.path: (i, e.blocks) for i, e in enumerate(prev.entries) if e.type == EntryType.FILE}
    if prev.single_file and len(entries) == 1 and len(files) == 1:
        # A disk image keeps its identity when its file name changes.
        files = {entries[0].path: next(iter(files.values()))}
    return files.get


def _segments(
    tree_files: list[SourceFile],
    path_of: Callable[[int], str],
    previous: PreviousLookup,
    prev_digest: bytes,
    store: Store,
    block_size: int,
) -> Iterator[list[_Segment]]:
    """Group the files' blocks into jobs of about JOB_BYTES (small files share a job)."""
    per_job = max(1, JOB_BYTES // block_size)
    job: list[_Segment] = []
    job_blocks = 0
    for source in tree_files:
        count = -(-source.size // block_size)
        if count == 0:
            continue
        prev_xxh = prev_ids = b""
        if count >= PREFILTER_MIN_BLOCKS and (found := previous(path_of(source.entry_index))) is not None:
            index, ids = found
            packed = store.catalog.prefilter(prev_digest, index)
            if packed is not None:
                prev_xxh, prev_ids = packed, ids
        first = 0
        while first < count:
            take = min(per_job - job_blocks, count - first)
            job.append(
                _Segment(
                    source.entry_index,
                    source.disk_path,
                    source.size,
                    first,
                    take,
                    prev_xxh[first * XXH_SIZE : (first + take) * XXH_SIZE],
                    prev_ids[first * DIGEST_SIZE : (first + take) * DIGEST_SIZE],
                    source.identity,
                )
            )
            job_blocks += take
            first += take
            if job_blocks >= per_job:
                yield job
                job, job_blocks = [], 0
    if job:
        yield job


def resolve_block_size(store: Store, layer: str, requested: int | None, default: int) -> int:
    record = store.catalog.layer_or_none(layer)
    if record is None:
        return requested or default
    current = store.catalog.version(layer, record.latest).block_size
    if requested is not None and requested != current:
        raise InvalidBlockSize(
            requested, f"layer {layer!r} uses {current}-byte blocks; a layer's block size is fixed"
        )
    return current


@dataclass
class PreparedVersion:
    """An ingest whose blocks are durable but whose version is not committed yet.

    Its blocks stay pinned (safe from GC) until ``release``: commit it locally (``ingest`` does) or
    elsewhere (``publish`` commits at the coordinator, then records the coordinator's version).
    """

    manifest: Manifest
    manifest_bytes: bytes
    prefilter: dict[int, bytes]
    pins: IngestPins
    result: IngestResult
    started: float

    def release(self, store: Store, committed: bool) -> None:
        store.end_ingest(self.pins, committed=committed)


@dataclass
class CutFiles:
    """Files cut into blocks, their new blocks durable and pinned (until ``release``), no manifest yet."""

    digests: dict[int, bytes]  # entry index -> packed block ids
    prefilter: dict[int, bytes]  # entry index -> packed xxh3 digests (files of PREFILTER_MIN_BLOCKS or more)
    heads: dict[int, bytes]  # entry index -> the file's first HEAD_BYTES (for callers that classify)
    pins: IngestPins
    result: IngestResult

    def release(self, store: Store, committed: bool) -> None:
        store.end_ingest(self.pins, committed=committed)


def cut_files(
    store: Store,
    layer: str,
    files: list[SourceFile],
    path_of: Callable[[int], str],
    previous: PreviousLookup,
    prev_digest: bytes,
    block_size: int,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> CutFiles:
    """Read ``files`` and store their new blocks durably (the ingest pipeline: see the module
    docstring). ``previous(path)`` names the previous version's file at a path, whose pre-filter
    record (in manifest ``prev_digest``) lets unchanged blocks skip SHA-256 and the store."""
    total = sum(f.size for f in files)
    digests: dict[int, bytearray] = {
        f.entry_index: bytearray(-(-f.size // block_size) * DIGEST_SIZE) for f in files
    }
    xxhs: dict[int, bytearray] = {
        f.entry_index: bytearray(-(-f.size // block_size) * XXH_SIZE) for f in files
    }
    pins = store.begin_ingest(layer)
    work = _Ingest(store, block_size, pins)
    written: set[bytes] = set()
    heads: dict[int, bytes] = {}
    stats = IngestResult()
    done = 0
    workers = workers or os.cpu_count() or 2
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
            inflight: deque[Future[list[_SegmentResult]]] = deque()

            def consume(results: list[_SegmentResult]) -> None:
                nonlocal done
                values = []
                for r in results:
                    seg = r.segment
                    d = digests[seg.file_index]
                    d[seg.first_block * DIGEST_SIZE : (seg.first_block + seg.count) * DIGEST_SIZE] = r.digests
                    x = xxhs[seg.file_index]
                    x[seg.first_block * XXH_SIZE : (seg.first_block + seg.count) * XXH_SIZE] = r.xxhs
                    stats.blocks += seg.count
                    stats.holes += r.holes
                    stats.reused += r.reused
                    stats.deduplicated += r.deduplicated
                    stats.bytes_read += r.bytes_read
                    if seg.first_block == 0:
                        heads[seg.file_index] = r.head
                    for digest, value, raw_size in r.new_values:
                        if digest in written:
                            stats.deduplicated += 1
                            continue
                        written.add(digest)
                        values.append((digest, value))
                        stats.new_blocks += 1
                        stats.new_bytes += raw_size
                        stats.new_stored_bytes += len(value)
                    done += min(seg.count * block_size, seg.file_size - seg.first_block * block_size)
                if values:
                    store.blocks.put_many(values)
                if progress is not None:
                    progress(done, total)

            for job in _segments(files, path_of, previous, prev_digest, store, block_size):
                inflight.append(pool.submit(work.process, job))
                if len(inflight) > workers * 2:
                    consume(inflight.popleft().result())
            while inflight:
                consume(inflight.popleft().result())
        store.blocks.persist()
    except BaseException:
        store.end_ingest(pins, committed=False)
        raise
    prefilter = {
        index: bytes(xxhs[index])
        for index, packed in digests.items()
        if len(packed) // DIGEST_SIZE >= PREFILTER_MIN_BLOCKS
    }
    return CutFiles({i: bytes(d) for i, d in digests.items()}, prefilter, heads, pins, stats)


def prepare(
    store: Store, path: Path | str, options: IngestOptions, progress: ProgressFn | None = None
) -> PreparedVersion:
    """Cut PATH into blocks, store the new ones durably, and build the manifest (no version yet)."""
    started = time.monotonic()
    validate_layer_name(options.layer)
    for tag in options.tags:
        validate_tag(tag)
    tree = scan(Path(path))
    content = resolve_chunking(store, options, tree.single_file)
    if content is not None:
        return _prepare_content(store, tree, options, content, started, progress)
    block_size = resolve_block_size(store, options.layer, options.block_size, options.new_layer_block_size)
    prev, prev_digest = _previous_for(store, options.layer, block_size)
    cut = cut_files(
        store,
        options.layer,
        tree.files,
        lambda index: tree.entries[index].path,
        _previous_files(prev, tree.entries),
        prev_digest,
        block_size,
        options.workers,
        progress,
    )
    entries = list(tree.entries)
    for index, packed in cut.digests.items():
        entries[index] = replace(entries[index], blocks=packed)
    manifest = Manifest(block_size, tree.single_file, tuple(entries))
    stats = cut.result
    stats.logical_bytes = manifest.logical_bytes
    stats.skipped = list(tree.skipped)
    return PreparedVersion(manifest, manifest_to_bytes(manifest), cut.prefilter, cut.pins, stats, started)


def _latest_manifest(store: Store, layer: str) -> tuple[Manifest, bytes] | None:
    record = store.catalog.layer_or_none(layer)
    if record is None:
        return None
    info = store.catalog.version(layer, record.latest)
    return store.catalog.manifest(info.manifest_digest), info.manifest_digest


def resolve_chunking(store: Store, options: IngestOptions, single_file: bool) -> ChunkParams | None:
    """The content-chunking parameters of this ingest, or None for fixed blocks. A layer keeps the
    chunking it was made with (as it keeps its block size); a new disk image gets the requested or
    the default one, a tree always fixed blocks (per-file chunks gain little for files cut alone)."""
    latest = _latest_manifest(store, options.layer)
    if latest is not None:
        manifest = latest[0]
        if options.chunking is not None and options.chunking != manifest.chunking:
            raise InvalidInput(
                f"layer {options.layer!r} uses {manifest.chunking} chunking; a layer's chunking is fixed"
            )
        if manifest.chunking != Chunking.CONTENT:
            return None
        if options.block_size is not None:
            raise InvalidBlockSize(options.block_size, f"layer {options.layer!r} uses content chunking")
        return ChunkParams(manifest.unit_size, manifest.chunk_average)
    chunking = options.chunking if options.chunking is not None else options.new_layer_chunking
    if chunking != Chunking.CONTENT or not single_file:
        if options.chunking == Chunking.CONTENT and not single_file:
            raise InvalidInput(f"content chunking is for disk images; {options.layer!r} would hold a tree")
        return None
    if options.block_size is not None:
        raise InvalidBlockSize(options.block_size, "--block-size applies to fixed chunking only")
    return options.chunk_params


def _prepare_content(
    store: Store,
    tree: SourceTree,
    options: IngestOptions,
    params: ChunkParams,
    started: float,
    progress: ProgressFn | None,
) -> PreparedVersion:
    """Cut a disk image into content-aligned chunks (cachepoint/layers/chunked.py)."""
    previous = {}
    latest = _latest_manifest(store, options.layer)
    if latest is not None and tree.files:
        manifest, digest = latest
        files = [i for i, e in enumerate(manifest.entries) if e.type == EntryType.FILE]
        if len(files) == 1:  # a disk image keeps its identity when its file name changes
            entry = manifest.entries[files[0]]
            previous = previous_chunks(entry, manifest.block_size, store.catalog.prefilter(digest, files[0]))
    pins = store.begin_ingest(options.layer)
    stats = IngestResult()
    entries = list(tree.entries)
    prefilter: dict[int, bytes] = {}
    try:
        for source in tree.files:
            cut = cut_content(
                store, source, params, pins, previous, options.workers or os.cpu_count() or 2, progress
            )
            entries[source.entry_index] = replace(
                entries[source.entry_index], blocks=cut.blocks, extents=cut.extents
            )
            prefilter[source.entry_index] = cut.prefilter
            stats.blocks += cut.chunks + cut.holes
            stats.holes += cut.holes
            stats.reused += cut.reused
            stats.deduplicated += cut.deduplicated
            stats.new_blocks += cut.new_blocks
            stats.new_bytes += cut.new_bytes
            stats.new_stored_bytes += cut.new_stored_bytes
            stats.bytes_read += cut.bytes_read
        store.blocks.persist()
    except BaseException:
        store.end_ingest(pins, committed=False)
        raise
    manifest = Manifest(
        params.max_length,
        tree.single_file,
        tuple(entries),
        chunking=Chunking.CONTENT,
        unit_size=params.unit,
        chunk_average=params.average,
    )
    stats.logical_bytes = manifest.logical_bytes
    stats.skipped = list(tree.skipped)
    return PreparedVersion(manifest, manifest_to_bytes(manifest), prefilter, pins, stats, started)


def unchanged_here(store: Store, options: IngestOptions, prepared: PreparedVersion) -> VersionInfo | None:
    """The version of this store the target tags name, if it has the prepared content (see
    ``cachepoint.layers.unchanged``)."""

    def named(tag: str) -> VersionInfo | None:
        try:
            return store.catalog.resolve(Ref(options.layer, tag=tag))
        except NotFound:
            return None

    existing = named_by_all(named(tag) for tag in target_tags(options.tags))
    if existing is None:
        return None
    if existing.manifest_digest == manifest_digest(prepared.manifest_bytes):
        return existing
    old = store.catalog.manifest(existing.manifest_digest)
    return existing if same_content(old, prepared.manifest) else None


def ingest(
    store: Store, path: Path | str, options: IngestOptions, progress: ProgressFn | None = None
) -> IngestResult:
    """Make a new version of a layer from a file or a tree: prepare, then commit it locally (unless
    the target tag already names this content and ``allow_same`` is off: then the result names that
    version and says ``unchanged``)."""
    prepared = prepare(store, path, options, progress)
    result = prepared.result
    committed = False
    try:
        if not options.allow_same and (same := unchanged_here(store, options, prepared)) is not None:
            result.version, result.unchanged = same, True
            result.seconds = time.monotonic() - prepared.started
            return result
        info = store.catalog.commit(
            layer=options.layer,
            kind=options.kind,
            pending=PendingCommit(prepared.manifest_bytes, prepared.prefilter, prepared.pins.ingest_id),
            manifest=prepared.manifest,
            author=options.author or default_author(),
            device=options.device or os.uname().nodename,
            message=options.message,
            tags=options.tags,
        )
        committed = True
    finally:
        prepared.release(store, committed)
    result.version = info
    result.seconds = time.monotonic() - prepared.started
    return result
