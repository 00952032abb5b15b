"""Blocks a daemon's disks keep reading from the store are re-stored in the read-side codec (lz4).

A disk whose blocks do not all fit in the decoded cache (cachepoint/disk/readcache.py) reads the rest
from the store on every pass, and each such read is a zstd decode: on the real disk image's blocks
60-70 µs of 64 KiB, the largest cost of a copy through NBD. lz4 decodes the same block in about 16
µs for a quarter more bytes. Re-storing every block read would cost a one-time reader (a boot, an
export) an lz4 encode per block and that quarter of disk space for nothing, so a block is re-stored
the second time this node decodes it from zstd for a reader, as ARC's ghost lists tell a block
read twice from one read once: ``seen`` remembers the first decode of up to SEEN_SLOTS blocks (a
direct-mapped table of digest prefixes: a collision forgets the older one, which then waits for
one more read), and the blocks lz4 would grow too much, so that they are not encoded again.

Only this node's store changes: ingest, the coordinator and what a pull fetches from it keep zstd;
a site peer fetching such a block from this node gets it as stored (lz4) and verifies it like any
other, and every reader takes both codecs (an older peer that does not refuses it as undecodable and
fetches it from the next source). The value is rewritten without the WAL: a crash keeps either the
zstd or the lz4 value, and both decode to the block. Nothing is re-stored while the daemon's pulls
are paused for lack of space (min_free). A block that GC deletes while a reader re-stores it can
come back unreferenced; the next GC deletes it.
"""

from __future__ import annotations

import array
import logging
import threading
from collections.abc import Callable

from cachepoint.blocks import CODEC_LZ4, CODEC_ZSTD, encode_fast
from cachepoint.errors import InvalidInput
from cachepoint.store.store import Store

log = logging.getLogger(__name__)

SEEN_SLOTS = 1 << 18  # 2 MiB of table: the first reads of 256 Ki blocks (16 GiB of 64 KiB blocks)
# A value lz4 makes more than this much longer than zstd's stays in zstd: text-like data that zstd's
# entropy stage shrinks several times over. On the real disk image's blocks 94% are within it, for 29%
# more bytes; within 1.5x were 81%.
MAX_GROWTH = 2.0


HOT_CODECS = {"lz4": True, "none": False}


def parse_hot_codec(text: str) -> bool:
    """The ``hot_codec`` setting: "lz4" (re-store blocks read again) or "none" (keep them as stored)."""
    try:
        return HOT_CODECS[text.strip().lower()]
    except KeyError:
        raise InvalidInput(f"hot_codec {text!r}: it must be one of {', '.join(HOT_CODECS)}") from None


class Recoder:
    """Re-stores in lz4 the zstd blocks that readers of one store decode a second time."""

    def __init__(self, store: Store, allowed: Callable[[], bool] = lambda: True) -> None:
        """``allowed``: whether re-storing may take disk space now (a daemon: not while its pulls are
        paused at min_free, cachepoint/replication/gate.py)."""
        self.store = store
        self.allowed = allowed
        self._seen = array.array("Q", bytes(8 * SEEN_SLOTS))
        self._mask = SEEN_SLOTS - 1
        self._lock = threading.Lock()
        self.recoded = 0  # blocks re-stored in lz4
        self.bytes_before = 0  # their stored bytes in zstd
        self.bytes_after = 0  # and in lz4 (after minus before: the disk space it took)
        self.kept = 0  # blocks read twice that lz4 would have grown too much

    def _place(self, digest: bytes) -> tuple[int, int]:
        """A block's key in ``seen`` (never 0, the empty slot; key - 1 marks a block kept in zstd) and
        its slot."""
        key = int.from_bytes(digest[:8], "little") | 1
        return key, (key >> 1) & self._mask

    def decoded(self, values: dict[bytes, bytes], plain: dict[bytes, bytes | memoryview]) -> None:
        """The stored ``values`` a reader just decoded into ``plain`` (same ids): those in zstd that
        were decoded before are re-stored in lz4."""
        again: list[tuple[bytes, int, int]] = []  # (id, key, slot)
        seen = self._seen
        for digest, value in values.items():
            if value[0] != CODEC_ZSTD:
                continue
            key, slot = self._place(digest)
            if seen[slot] == key:
                again.append((digest, key, slot))
            elif seen[slot] != key - 1:
                seen[slot] = key
        if not again or not self.allowed():
            return
        writes: list[tuple[bytes, bytes]] = []
        before = after = kept = 0
        for digest, key, slot in again:
            value = encode_fast(plain[digest])
            old = len(values[digest])
            if value[0] != CODEC_LZ4 or len(value) > old * MAX_GROWTH:
                kept += 1
                seen[slot] = key - 1
                continue
            writes.append((digest, value))
            before += old
            after += len(value)
        if writes:
            try:
                self.store.blocks.put_many(writes, durable=False)
            except Exception as err:  # a full disk or a closing store costs the speed-up, never the read
                log.warning("could not re-store %d blocks in lz4: %s", len(writes), err)
                return
        with self._lock:
            self.recoded += len(writes)
            self.bytes_before += before
            self.bytes_after += after
            self.kept += kept
