"""The local store as a source: a RocksDB read and a decode per block, no hashing (verified once)."""

from __future__ import annotations

from collections.abc import Sequence

from cachepoint.blocks import MAX_BLOCK_SIZE, block_digest, decode_batch, decode_stored
from cachepoint.blocksource.base import BlockSource
from cachepoint.blocksource.recode import Recoder
from cachepoint.errors import BlockCorrupt
from cachepoint.ids import BlockId
from cachepoint.store.store import Store


class StoreSource(BlockSource):
    def __init__(
        self, store: Store, block_size: int = MAX_BLOCK_SIZE, recoder: Recoder | None = None
    ) -> None:
        """``block_size``: the largest block a reader of this source expects; a stored value that
        would decode to more is BlockOversized (refused before it is decoded). ``recoder``: blocks
        decoded again are re-stored in lz4 (a daemon's disks and HTTP reader; recode.py)."""
        self.store = store
        self.block_size = block_size
        self.recoder = recoder

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        ids = list(ids)
        values = self.store.blocks.raw_many(ids)  # BlockUnreadable names a record RocksDB refused
        return {digest: value for digest, value in zip(ids, values, strict=True) if value is not None}

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        size = self.block_size
        values = self.stored_many(ids)
        plain = {digest: decode_stored(digest, value, size) for digest, value in values.items()}
        if self.recoder is not None:
            self.recoder.decoded(values, plain)
        return plain

    def get_views(
        self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()
    ) -> dict[bytes, bytes | memoryview]:
        values = self.stored_many(ids)
        plain = decode_batch(values, self.block_size)
        if self.recoder is not None:
            self.recoder.decoded(values, plain)
        return plain

    def keep(self, values: dict[bytes, bytes]) -> None:
        """Write stored values that were verified on arrival, with the WAL on: a daemon killed a
        moment later keeps them."""
        self.store.blocks.put_many(values.items(), durable=True)

    def lacking(self, ids: Sequence[bytes]) -> list[bytes]:
        """The ids of ``ids`` this store does not hold (bloom filters answer most without a read)."""
        return self.store.blocks.missing(ids)


class VerifiedSource(BlockSource):
    """Any source with every block it gives checked against its id (SHA-256): for readers whose
    output states a digest of its own (the coordinator's evidence exports), where a block that rotted
    since the last scrub must fail the read rather than be signed."""

    def __init__(self, inner: BlockSource) -> None:
        self.inner = inner
        self.far = inner.far

    def get_many(self, ids: Sequence[bytes], *, also: Sequence[bytes] = ()) -> dict[bytes, bytes]:
        found = self.inner.get_many(ids, also=also)
        for digest, data in found.items():
            actual = block_digest(data)
            if actual != digest:
                raise BlockCorrupt(BlockId(digest), BlockId(actual))
        return found

    def stored_many(self, ids: Sequence[bytes]) -> dict[bytes, bytes]:
        return self.inner.stored_many(ids)


def as_source(reader: Store | BlockSource) -> BlockSource:
    """A reader's source: a store given as such reads its own blocks."""
    return StoreSource(reader) if isinstance(reader, Store) else reader
