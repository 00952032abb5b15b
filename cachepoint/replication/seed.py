"""The seed of a unit fetch: the units this store already holds, found by their digests.

As casync's ``--seed``: the chunks of the versions of the layer held here (the previous version,
usually) are where a new version's units are most likely to be. Their unit digests come from the
``units`` family (cachepoint/store/units.py); a chunk without a record (a store written before unit
fetch, or a chunk of a local ingest) is decoded and hashed once, and its record written, so the cost
is paid by the first pull that needs it. Only the units a pull wants are remembered (``locate``), so
memory follows the new version's units, not the store's size.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable

from cachepoint.blocks import MAX_BLOCK_SIZE, decode_stored
from cachepoint.chunking import UNIT_DIGEST_SIZE, unit_digests
from cachepoint.model import Chunking
from cachepoint.store.store import Store

SEED_VERSIONS = 3
PRELOAD_BYTES = 64 * 1024 * 1024  # records read ahead (16 bytes a unit: 16 GiB of seed); the rest after
READ_BATCH = 1024  # chunk records or values read per call
DECODED_CHUNKS = 512  # decoded chunks kept between reads: neighbouring new chunks reuse the same old ones

Place = tuple[bytes, int]  # (chunk id, unit index)


class Seed:
    def __init__(self, store: Store, unit: int) -> None:
        self.store = store
        self.unit = unit
        self.where: dict[bytes, Place] = {}  # unit digest -> a chunk here (or planned) that has it
        self.indexed = 0  # records made from chunks' bytes, for a store or chunks without them
        self._decoded: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()  # ``read`` runs in two threads at once
        self._chunks: list[bytes] = []
        self._loaded: list[dict[bytes, bytes]] = []
        self._next = 0

    def candidates(self, layer: str) -> list[bytes]:
        """The chunks of the SEED_VERSIONS newest content-chunked versions of ``layer`` held here
        (each version's manifest is read and its chunks' records scanned: a bound on the cost per pull;
        the previous version holds nearly all the units a new one shares)."""
        catalog = self.store.catalog
        found: dict[bytes, None] = {}
        if catalog.layer_or_none(layer) is None:  # a first pull of the layer: no seed
            return []
        taken = 0
        for info in sorted(catalog.versions(layer), key=lambda v: v.number, reverse=True):
            manifest = catalog.manifest(info.manifest_digest)
            if manifest.chunking != Chunking.CONTENT or manifest.unit_size != self.unit:
                continue
            for entry in manifest.entries:
                found.update(dict.fromkeys(entry.stored_digests()))
            taken += 1
            if taken == SEED_VERSIONS:
                break
        return list(found)

    def load(self, chunks: list[bytes]) -> None:
        """Read the records of ``chunks`` (held here), up to PRELOAD_BYTES of them, making those that
        are absent: while the unit digests of the new chunks are on their way."""
        self._chunks, self._loaded, self._next = chunks, [], 0
        size = 0
        while self._next < len(chunks) and size < PRELOAD_BYTES:
            records = self._records(chunks[self._next : self._next + READ_BATCH])
            self._loaded.append(records)
            size += sum(len(packed) for packed in records.values())
            self._next += READ_BATCH

    def locate(self, wanted: set[bytes]) -> None:
        """Remember where each unit of ``wanted`` lies among the chunks ``load`` was given."""
        for records in self._loaded:
            self._add_many(records, wanted)
        self._loaded = []
        for start in range(self._next, len(self._chunks), READ_BATCH):
            self._add_many(self._records(self._chunks[start : start + READ_BATCH]), wanted)

    def _records(self, batch: list[bytes]) -> dict[bytes, bytes]:
        records = self.store.units.get_many(batch, self.unit)
        lacking = [digest for digest in batch if digest not in records]
        if lacking:
            records.update(self._index(lacking))
        return records

    def _add_many(self, records: dict[bytes, bytes], wanted: set[bytes]) -> None:
        """Most units held here are not wanted: they are sliced and tested in bulk (list
        comprehensions, ~0.1 us a unit), and only the hits are placed."""
        size = UNIT_DIGEST_SIZE
        blob = b"".join(records.values())
        hits = [
            k
            for k, digest in enumerate(blob[i : i + size] for i in range(0, len(blob), size))
            if digest in wanted
        ]
        if not hits:
            return
        chunks = list(records)
        starts = list(itertools.accumulate((len(packed) // size for packed in records.values()), initial=0))
        where = self.where
        for k in hits:
            owner = bisect.bisect_right(starts, k) - 1
            digest = blob[k * size : (k + 1) * size]
            if digest not in where:
                where[digest] = (chunks[owner], k - starts[owner])

    def forget(self, chunk: bytes, packed: bytes) -> None:
        """A chunk planned to hold units that did not arrive: later chunks fetch those units themselves."""
        for index in range(len(packed) // UNIT_DIGEST_SIZE):
            digest = packed[index * UNIT_DIGEST_SIZE : (index + 1) * UNIT_DIGEST_SIZE]
            if self.where.get(digest) == (chunk, index):
                del self.where[digest]

    def _index(self, chunks: list[bytes]) -> dict[bytes, bytes]:
        """Records for chunks that have none, made from their bytes and written (derived state)."""
        made: dict[bytes, bytes] = {}
        for chunk, value in zip(chunks, self.store.blocks.raw_many(chunks), strict=True):
            if value is None:
                continue
            try:
                made[chunk] = unit_digests(decode_stored(chunk, value, MAX_BLOCK_SIZE), self.unit)
            except Exception:  # unreadable here: its units are simply not offered
                continue
        self.store.units.put_many((chunk, self.unit, packed) for chunk, packed in made.items())
        self.indexed += len(made)
        return made

    def read(self, places: Iterable[Place]) -> dict[Place, bytes]:
        """The bytes of units held here; a place whose chunk is gone or unreadable is left out."""
        unit = self.unit
        by_chunk: dict[bytes, list[int]] = {}
        for chunk, index in places:
            by_chunk.setdefault(chunk, []).append(index)
        with self._lock:
            decoded = {chunk: self._decoded[chunk] for chunk in by_chunk if chunk in self._decoded}
        absent = [chunk for chunk in by_chunk if chunk not in decoded]
        for start in range(0, len(absent), READ_BATCH):
            batch = absent[start : start + READ_BATCH]
            for chunk, value in zip(batch, self.store.blocks.raw_many(batch), strict=True):
                if value is None:
                    continue
                try:
                    decoded[chunk] = decode_stored(chunk, value, MAX_BLOCK_SIZE)
                except Exception:  # unreadable here: those units are fetched instead
                    continue
        found: dict[Place, bytes] = {}
        with self._lock:
            for chunk in by_chunk:
                if chunk in decoded:
                    self._keep(chunk, decoded[chunk])
        for chunk, indexes in by_chunk.items():
            data = decoded.get(chunk)
            if data is None:
                continue
            for index in indexes:
                piece = data[index * unit : (index + 1) * unit]
                if piece:
                    found[(chunk, index)] = piece
        return found

    def _keep(self, chunk: bytes, data: bytes) -> None:
        self._decoded[chunk] = data
        self._decoded.move_to_end(chunk)
        while len(self._decoded) > DECODED_CHUNKS:
            self._decoded.popitem(last=False)
