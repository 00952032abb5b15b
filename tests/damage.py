"""Damaging one stored block of a store that no process holds, in the two ways a disk rots.

- ``rot``: one bit of a zstd-compressed value flips, and the value is written back the way an ingest
  writes one, so every RocksDB checksum holds: only the block's SHA-256 id can tell.
- ``flip_in_sst``: bytes of a raw value flip inside its SST file, so RocksDB's own block checksum
  refuses to read it.

Each returns the victim's digest, chosen among the blocks of the store with the codec it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachepoint.blocks import CODEC_RAW, CODEC_ZSTD, decode_verified
from cachepoint.errors import BlockCorrupt, BlockUnreadable
from cachepoint.store.store import Store

Damage = Callable[[Path], bytes]


def _victim(store: Store, codec: int) -> tuple[bytes, bytes]:
    values, error = store.blocks.scan_unchecked(None, 1 << 20)
    assert not error, error
    for digest, value in values:
        if value[0] == codec and len(value) > 21_000:
            return digest, value
    raise AssertionError(f"the store holds no block stored with codec {codec}")


def rot(store_dir: Path) -> bytes:
    with Store.open(store_dir, writable=True) as store:
        victim, value = _victim(store, CODEC_ZSTD)
        middle = len(value) // 2
        rotten = value[:middle] + bytes((value[middle] ^ 0x10,)) + value[middle + 1 :]
        with pytest.raises(BlockCorrupt):
            decode_verified(victim, rotten)
        store.blocks.put_many([(victim, rotten)])
        store.blocks.persist()
    return victim


def flip_value_in_sst(store_dir: Path, value: bytes) -> None:
    """Flip 16 bytes of a raw stored value inside the one SST file that holds it (RocksDB's
    compression is off, so the value's bytes sit there verbatim)."""
    needle = value[20_000:20_064]
    hits = []
    for sst in sorted((store_dir / "db").glob("*.sst")):
        data = sst.read_bytes()
        at = data.find(needle)
        if at >= 0:
            assert data.find(needle, at + 1) < 0
            hits.append((sst, at))
    assert len(hits) == 1, f"the block's bytes are in {len(hits)} SST files"
    sst, at = hits[0]
    with open(sst, "r+b") as f:
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in needle[:16]))


def flip_in_sst(store_dir: Path) -> bytes:
    with Store.open(store_dir, writable=True) as store:
        store.blocks.persist()  # blocks a daemon received may still be in its WAL only
        victim, value = _victim(store, CODEC_RAW)
    flip_value_in_sst(store_dir, value)
    with Store.open(store_dir) as store, pytest.raises(BlockUnreadable):
        store.blocks.raw(victim)
    return victim


# The kind of damage, and the word scrub and fsck use for it.
DAMAGE = [
    pytest.param(rot, "corrupt-block", id="zstd-bit-flip-below-rocksdb"),
    pytest.param(flip_in_sst, "unreadable-block", id="bytes-flipped-in-sst"),
]
