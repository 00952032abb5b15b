"""Blocks in the store: presence, staged writes, verified reads, sizes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockMissing
from cachepoint.ids import BlockId
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB


class BlockStore:
    def __init__(self, db: StoreDB) -> None:
        self._db = db
        self._cf = db.cf[fmt.CF_BLOCKS]
        self._handle = db.handle[fmt.CF_BLOCKS]

    def has(self, digest: bytes) -> bool:
        # key_may_exist answers "no" from the bloom filter without I/O; only a "maybe" costs a read.
        if not self._cf.key_may_exist(digest):
            return False
        return self._cf.get(digest) is not None

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if not self.has(d)]

    def put_many(self, values: Iterable[tuple[bytes, bytes]]) -> int:
        """Stage encoded blocks with the WAL off; they are durable only after ``persist()``."""
        batch = self._db.batch()
        written = 0
        for digest, value in values:
            batch.put(digest, value, self._handle)
            written += len(value)
        self._db.write(batch, wal=False)
        return written

    def persist(self) -> None:
        """Make every staged block durable; called before any version that names them commits."""
        self._db.flush(fmt.CF_BLOCKS)

    def raw(self, digest: bytes) -> bytes | None:
        return self._cf.get(digest)

    def raw_many(self, digests: list[bytes]) -> list[bytes | None]:
        return self._cf.get(digests) if digests else []

    def read(self, digest: bytes) -> bytes:
        value = self._cf.get(digest)
        if value is None:
            raise BlockMissing(BlockId(digest))
        return decode_verified(digest, value)

    def delete_many(self, digests: Iterable[bytes]) -> int:
        batch = self._db.batch()
        count = 0
        for digest in digests:
            batch.delete(digest, self._handle)
            count += 1
        if count:
            self._db.write(batch, sync=True)
        return count

    def scan(self) -> Iterator[tuple[bytes, bytes]]:
        return self._db.scan(fmt.CF_BLOCKS)

    def scan_ids(self) -> Iterator[bytes]:
        return self._db.scan_keys(fmt.CF_BLOCKS)
