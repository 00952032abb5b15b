"""A file of a version as bytes and as a whole-file SHA-256, read from its blocks.

Manifests keep block ids, not a digest of the whole file, so the digest is computed by reading the
file. The result is cached under a key made of the block size, the size and the block ids: a file
that did not change between versions (the common case in a user's history) is read once, whichever
version, layer or path names it.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator

from cachepoint.blocksource import BlockSource, as_source
from cachepoint.blocksource.base import require
from cachepoint.ids import HOLE_DIGEST
from cachepoint.model import FileEntry
from cachepoint.store.store import Store

READ_BATCH = 16  # blocks asked of the source per call
CHUNK_BYTES = 1024 * 1024  # what a reader yields at a time (and what travels per message)
CACHE_ENTRIES = 65_536  # ~100 bytes each


def content_key(entry: FileEntry, block_size: int) -> bytes:
    """Equal keys mean equal bytes (the same blocks, in the same order, cut at the same size)."""
    return hashlib.sha256(struct.pack(">IQ", block_size, entry.size) + entry.blocks + entry.extents).digest()


class FileReader:
    def __init__(self, source: Store | BlockSource) -> None:
        self.source = as_source(source)
        self._digests: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def blocks(self, entry: FileEntry, block_size: int) -> Iterator[bytes]:
        """The file's bytes block by block; holes as zeros. BlockMissing names a block the source
        lacks (see cachepoint/blocksource for the other errors)."""
        digests = entry.digests()
        for start in range(0, len(digests), READ_BATCH):
            batch = digests[start : start + READ_BATCH]
            stored = [d for d in dict.fromkeys(batch) if d != HOLE_DIGEST]
            found = self.source.get_many(stored)
            require(stored, found)
            for index, digest in enumerate(batch, start):
                lo, hi = entry.span(index, block_size)
                yield bytes(hi - lo) if digest == HOLE_DIGEST else found[digest][: hi - lo]

    def chunks(self, entry: FileEntry, block_size: int) -> Iterator[bytes]:
        """The file's bytes in pieces of about CHUNK_BYTES."""
        pending: list[bytes] = []
        size = 0
        for data in self.blocks(entry, block_size):
            pending.append(data)
            size += len(data)
            if size >= CHUNK_BYTES:
                yield b"".join(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending)

    def remember(self, entry: FileEntry, block_size: int, sha256_hex: str) -> None:
        with self._lock:
            key = content_key(entry, block_size)
            self._digests[key] = sha256_hex
            self._digests.move_to_end(key)
            while len(self._digests) > CACHE_ENTRIES:
                self._digests.popitem(last=False)

    def sha256(self, entry: FileEntry, block_size: int) -> str:
        """``sha256:<hex>`` of the file's bytes."""
        key = content_key(entry, block_size)
        with self._lock:
            known = self._digests.get(key)
        if known is not None:
            return f"sha256:{known}"
        digest = hashlib.sha256()
        for data in self.blocks(entry, block_size):
            digest.update(data)
        self.remember(entry, block_size, digest.hexdigest())
        return f"sha256:{digest.hexdigest()}"
