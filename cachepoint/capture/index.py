"""What a re-capture needs from the last one, kept in the store: the stat index and file classes.

**Stat index** (family ``capture_index``, one record per layer, rewritten by every capture in the
batch that commits its version, or alone when nothing changed). Layout, before the block codec
(zstd when it saves space)::

    format[1] = 1
    manifest digest[32]          the version the index describes
    root length[u16 BE] root     the captured directory (absolute, utf-8)
    count[u32 BE]                = the manifest's number of entries
    count x inode[u64 LE], count x device[u64 LE], count x ctime_ns[i64 LE]

Memory and space: 24 bytes per entry (1.2 MB for 50,000 files, before compression). A file is
unchanged when size, mtime and permission bits (from the manifest entry) and inode, device and ctime
(from here) all equal what ``lstat`` says now; then it is not opened at all. ctime catches what
mtime misses (a tool that restores mtimes, a chmod). The index is used only when it describes the
layer's latest version and the same directory; any other version (an ingest, a pull, a capture of
another directory) makes the next capture read every file, with the ingest pre-filter still
skipping unchanged blocks.

Racy files: file timestamps come from a coarse clock, so a file written in the same tick as it was
read could change without its mtime moving. Files whose mtime is within ``RACY_WINDOW_NS`` of the
capture's start get inode 0, which never matches: the next capture reads them again (git's "racy
clean" rule).

**File classes** (family ``file_classes``, keyed by manifest digest): one class code per manifest
entry (``classify.CODES``; 0 for directories). A version without a record (made by ingest, pulled
from the coordinator) gets its classes derived from names and each file's first block, read from
the store.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import rocksdict

from cachepoint.blocks import decode_block, encode_block
from cachepoint.blocksource import StoreSource
from cachepoint.capture import classify
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST
from cachepoint.model import EntryType, FileEntry
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

INDEX_FORMAT = 1
RACY_WINDOW_NS = 100_000_000  # 0.1 s: several ticks of the coarsest kernel timestamp clock (HZ=100)
MAX_INDEX_BYTES = 1 << 30
_HEAD = struct.Struct(">B32sH")
_COUNT = struct.Struct(">I")
STALE_INODE = 0  # "read this file again next time"


@dataclass(frozen=True, slots=True)
class StatIndex:
    manifest_digest: bytes
    root: str
    inodes: Sequence[int]
    devices: Sequence[int]
    ctimes: Sequence[int]

    def encode(self) -> bytes:
        root = self.root.encode()
        n = len(self.inodes)
        raw = b"".join(
            (
                _HEAD.pack(INDEX_FORMAT, self.manifest_digest, len(root)),
                root,
                _COUNT.pack(n),
                struct.pack(f"<{n}Q", *self.inodes),
                struct.pack(f"<{n}Q", *self.devices),
                struct.pack(f"<{n}q", *self.ctimes),
            )
        )
        return encode_block(raw)

    @classmethod
    def decode(cls, value: bytes) -> StatIndex | None:
        """The index, or None when it is of another format or damaged (a capture then reads every
        file: the index is an optimisation, never a source of truth)."""
        try:
            raw = decode_block(value, MAX_INDEX_BYTES)
            version, digest, root_length = _HEAD.unpack_from(raw)
            if version != INDEX_FORMAT:
                return None
            offset = _HEAD.size
            root = raw[offset : offset + root_length].decode()
            offset += root_length
            (n,) = _COUNT.unpack_from(raw, offset)
            offset += _COUNT.size
            if len(raw) != offset + 24 * n:
                return None
            inodes = struct.unpack_from(f"<{n}Q", raw, offset)
            devices = struct.unpack_from(f"<{n}Q", raw, offset + 8 * n)
            ctimes = struct.unpack_from(f"<{n}q", raw, offset + 16 * n)
        except Exception:  # undecodable, truncated, not utf-8: treat as absent
            return None
        return cls(digest, root, inodes, devices, ctimes)


def _family(store: Store, name: str) -> rocksdict.Rdict | None:
    # A read-only open of a store that predates the family does not have it.
    return store.db.cf.get(name)


def load_stat_index(store: Store, layer: str) -> StatIndex | None:
    family = _family(store, fmt.CF_CAPTURE_INDEX)
    raw = family.get(layer.encode()) if family is not None else None
    return StatIndex.decode(raw) if raw is not None else None


def stage_stat_index(batch: rocksdict.WriteBatch, store: Store, layer: str, index: StatIndex) -> None:
    batch.put(layer.encode(), index.encode(), store.db.handle[fmt.CF_CAPTURE_INDEX])


def write_stat_index(store: Store, layer: str, index: StatIndex) -> None:
    batch = store.db.batch()
    stage_stat_index(batch, store, layer, index)
    store.db.write(batch, sync=False)  # derived state: losing it costs one full re-read, nothing else


def stage_classes(batch: rocksdict.WriteBatch, store: Store, manifest_digest: bytes, codes: bytes) -> None:
    batch.put(manifest_digest, encode_block(codes), store.db.handle[fmt.CF_FILE_CLASSES])


def _first_blocks(store: Store, entries: Sequence[FileEntry], indexes: list[int]) -> dict[int, bytes]:
    """The first bytes of each file named by ``indexes`` (b"" for empty files and leading holes)."""
    heads = {i: b"" for i in indexes}
    by_digest: dict[bytes, list[int]] = {}
    for i in indexes:
        digest = entries[i].blocks[:DIGEST_SIZE]
        if digest and digest != HOLE_DIGEST:
            by_digest.setdefault(digest, []).append(i)
    ids = list(by_digest)
    source = StoreSource(store)
    for start in range(0, len(ids), 256):
        # A block not here (a lazily fetched version) is absent: its file's name alone decides.
        for digest, data in source.get_many(ids[start : start + 256]).items():
            head = data[: classify.MAGIC_BYTES]
            for i in by_digest[digest]:
                heads[i] = head
    return heads


def derive_classes(store: Store, entries: Sequence[FileEntry]) -> bytes:
    """Class codes of a manifest's entries from their names and first blocks (for versions that
    were not captured here)."""
    entries = list(entries)
    codes = bytearray(len(entries))
    files = [i for i, e in enumerate(entries) if e.type == EntryType.FILE]
    heads = _first_blocks(store, entries, files)
    for i, entry in enumerate(entries):
        if entry.type == EntryType.DIRECTORY:
            continue
        head = heads.get(i) if entry.type == EntryType.FILE else None
        codes[i] = classify.CODES[classify.classify(entry.path, head)]
    return bytes(codes)


class Classes:
    """The class codes of one manifest's entries: its record, or derived on demand (for a version that
    was not captured here) from each entry's name and first block."""

    def __init__(self, store: Store, manifest_digest: bytes, entries: Sequence[FileEntry]) -> None:
        self.store = store
        self.entries = entries
        family = _family(store, fmt.CF_FILE_CLASSES)
        raw = family.get(manifest_digest) if family is not None else None
        codes = decode_block(raw, MAX_INDEX_BYTES) if raw is not None else None
        self.recorded = codes if codes is not None and len(codes) == len(entries) else None

    def code(self, index: int) -> int:
        if self.recorded is not None:
            return self.recorded[index]
        entry = self.entries[index]
        if entry.type == EntryType.DIRECTORY:
            return 0
        head = _first_blocks(self.store, [entry], [0])[0] if entry.type == EntryType.FILE else None
        return classify.CODES[classify.classify(entry.path, head)]

    def all(self) -> bytes:
        return self.recorded if self.recorded is not None else derive_classes(self.store, self.entries)
