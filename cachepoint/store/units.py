"""Unit digests of stored content chunks: the local index a pull matches a new chunk's units against.

One record per chunk (``units`` family, cachepoint/store/format.py): the unit size and the xxh3-128
of each unit. Derived, store-local state: a record is written beside a chunk that arrives from
another machine, made from the chunk's own bytes when a pull needs it and it is absent (a store
written before unit fetch, or chunks made by a local ingest), and deleted with its chunk. A record
whose chunk is gone is harmless: reading the unit finds no chunk, and the unit is fetched instead.

Why per chunk and not unit digest -> (chunk, index): one write per chunk instead of one per 4 KiB
unit (eight per chunk at 32 KiB), and nothing to keep in step when chunks go. The reverse lookup a
pull needs is built in memory, for the units it wants only, from the records of the chunks of the
versions of the layer held here (the seed, as casync's): cachepoint/replication/seed.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cachepoint.chunking import UNIT_DIGEST_SIZE
from cachepoint.store import format as fmt
from cachepoint.store.db import StoreDB


def encode_record(unit: int, digests: bytes) -> bytes:
    return fmt.u32(unit) + digests


def decode_record(raw: bytes, unit: int) -> bytes | None:
    """The packed digests of a record made with units of ``unit`` bytes; None for another unit size or
    a malformed record (derived state: treated as absent and made again)."""
    if len(raw) < 4 or fmt.read_u32(raw[:4]) != unit or (len(raw) - 4) % UNIT_DIGEST_SIZE:
        return None
    return raw[4:]


class UnitRecords:
    def __init__(self, db: StoreDB) -> None:
        self._db = db  # column families looked up on each use, as BlockStore does

    def get_many(self, ids: Sequence[bytes], unit: int) -> dict[bytes, bytes]:
        """Packed unit digests of the chunks among ``ids`` that have a record for this unit size."""
        family = self._db.cf.get(fmt.CF_UNITS)  # a read-only open of an older store lacks the family
        if family is None or not ids:
            return {}
        found: dict[bytes, bytes] = {}
        for digest, raw in zip(ids, family.get(list(ids)), strict=True):
            if raw is not None and (digests := decode_record(raw, unit)) is not None:
                found[digest] = digests
        return found

    def put_many(self, records: Iterable[tuple[bytes, int, bytes]]) -> None:
        """(chunk id, unit size, packed digests) records, written without the WAL: a crash may lose
        the last ones, which are then made again from their chunks when a pull needs them."""
        handle = self._db.handle.get(fmt.CF_UNITS)
        if handle is None:
            return
        batch = self._db.batch()
        for digest, unit, digests in records:
            batch.put(digest, encode_record(unit, digests), handle)
        if len(batch):
            self._db.write(batch, wal=False)
