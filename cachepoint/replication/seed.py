"""The seed of a unit fetch: the units this store already holds, found by their digests.

As casync's ``--seed``: the chunks of the versions of the layer held here (the previous version,
usually) are where a new version's units are most likely to be. Their unit digests come from the
``units`` family (cachepoint/store/units.py); a chunk without a record (a store written before unit
fetch, or a chunk of a local ingest) is decoded and hashed once, and its record written, so the cost
is paid by the first pull that needs it. Memory follows the seed (the newest versions of the layer,
bounded by SEED_UNITS), not the store's size.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

from cachepoint.blocks import MAX_BLOCK_SIZE, decode_stored
from cachepoint.chunking import UNIT_DIGEST_SIZE, unit_digests
from cachepoint.model import Chunking
from cachepoint.store.store import Store

SEED_VERSIONS = 3
SEED_UNITS = 2 * 1024 * 1024  # units placed at most (the newest versions' first): a bound on memory
READ_BATCH = 1024  # chunk records or values read per call
DECODED_CHUNKS = 512  # decoded chunks kept between reads: neighbouring new chunks reuse the same old ones

Place = tuple[bytes, int]  # (chunk id, unit index)
Piece = bytes | memoryview  # a unit's bytes; a view into its decoded chunk where it was cut from one


class Seed:
    def __init__(self, store: Store, unit: int) -> None:
        self.store = store
        self.unit = unit
        self.where: dict[bytes, Place] = {}  # unit digest -> the new chunk of this pull that fetches it
        self.indexed = 0  # records made from chunks' bytes, for a store or chunks without them
        self._decoded: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()  # ``read`` runs in two threads at once
        self._held: dict[bytes, int] = {}  # unit digest -> its position among the seed's units
        self._order: list[bytes] = []  # the seed's chunks, in the order of their units' positions
        self._starts: list[int] = [0]  # the position of each chunk's first unit

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

    def load(self, chunks: list[bytes], stop: threading.Event | None = None) -> None:
        """Place every unit of ``chunks`` (held here; the newest versions' first), up to SEED_UNITS
        units, making the records that are absent. Runs while the first unit digests are on their way,
        so that each window of them can be matched as it arrives. Units are placed in bulk: digest ->
        its position among all the seed's units (~0.6 us a unit, ~100 bytes of memory each: 200 MiB
        at the bound, 8 GiB of seed at 4 KiB); the position is turned into (chunk, index) for the few
        that a new chunk wants (``held``)."""
        size = UNIT_DIGEST_SIZE
        order: list[bytes] = []
        starts = [0]
        parts: list[bytes] = []
        for start in range(0, len(chunks), READ_BATCH):
            if stop is not None and stop.is_set():  # the pull no longer needs it
                break
            records = self._records(chunks[start : start + READ_BATCH])
            for chunk, packed in records.items():
                order.append(chunk)
                starts.append(starts[-1] + len(packed) // size)
                parts.append(packed)
            if starts[-1] >= SEED_UNITS:
                break
        blob = b"".join(parts)
        count = len(blob) // size
        # Reversed, so that the first place of a digest is the one kept.
        digests = reversed([blob[at : at + size] for at in range(0, len(blob), size)])
        self._held = dict(zip(digests, range(count - 1, -1, -1), strict=True))
        self._order, self._starts = order, starts

    def held(self, digest: bytes) -> Place | None:
        """Where a unit is held here, or None."""
        position = self._held.get(digest)
        if position is None:
            return None
        owner = bisect.bisect_right(self._starts, position) - 1
        return self._order[owner], position - self._starts[owner]

    def _records(self, batch: list[bytes]) -> dict[bytes, bytes]:
        records = self.store.units.get_many(batch, self.unit)
        lacking = [digest for digest in batch if digest not in records]
        if lacking:
            records.update(self._index(lacking))
        return records

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

    def read(self, places: Iterable[Place]) -> dict[Place, Piece]:
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
        found: dict[Place, Piece] = {}
        with self._lock:
            for chunk in by_chunk:
                if chunk in decoded:
                    self._keep(chunk, decoded[chunk])
        for chunk, indexes in by_chunk.items():
            data = decoded.get(chunk)
            if data is None:
                continue
            view = memoryview(data)  # views, not copies: these ran with the GIL held
            for index in indexes:
                piece = view[index * unit : (index + 1) * unit]
                if piece:
                    found[(chunk, index)] = piece
        return found

    def _keep(self, chunk: bytes, data: bytes) -> None:
        self._decoded[chunk] = data
        self._decoded.move_to_end(chunk)
        while len(self._decoded) > DECODED_CHUNKS:
            self._decoded.popitem(last=False)


class SeedLoader:
    """A seed placed in worker threads from the moment a pull has its manifest, while it asks what is
    missing and for the first unit digests: placing ~200k units takes 0.2 s, which otherwise came
    after the first digests had arrived. ``close`` stops a load the pull turned out not to need
    (nothing missing, a shared fetch) and waits for the thread, which reads the store."""

    def __init__(self, seed: Seed, layer: str) -> None:
        self.seed = seed
        self.found = False  # whether the store holds a version of the layer to take units from
        self.listed = asyncio.Event()  # ``found`` is known
        self._stop = threading.Event()
        self._task = asyncio.create_task(self._run(layer))

    async def _run(self, layer: str) -> None:
        try:
            chunks = await asyncio.to_thread(self.seed.candidates, layer)
            self.found = bool(chunks)
        finally:
            self.listed.set()
        if chunks:
            await asyncio.to_thread(self.seed.load, chunks, self._stop)

    async def loaded(self) -> Seed:
        """The seed, placed (what the load raised is raised here)."""
        await self._task
        return self.seed

    async def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)
