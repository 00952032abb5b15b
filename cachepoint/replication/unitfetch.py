"""Unit fetch: the new content chunks of a pull, assembled from the units held here and only the
missing units fetched (docs/design.md "Unit fetch").

A file-system write of one 4 KiB page makes a new 32 KiB chunk whose other units this store already
holds, often in the previous version's chunk at the same place. So, for the chunks a pull lacks:
1. one FetchBlocks per 4096 chunks asks the source for their unit digests (xxh3-128 per unit);
2. the seed (cachepoint/replication/seed.py) finds which of those units are held here; a unit that
   several new chunks share is fetched once, by the first of them;
3. window after window of UNIT_WINDOW chunks, one FetchBlocks asks for the missing units only (each
   chunk's answer compressed as one zstd frame); every unit is checked against its digest, each chunk
   assembled from its units and checked against its SHA-256 id, then stored with its unit digests.
   The request of a window overlaps the assembly of the one before.
Whatever fails (a source without unit fetch answers with whole blocks, which are kept as such; a call
that fails; a unit or a chunk that does not match) is left to the whole-block fetcher: the pull ends
with the same verified bytes either way, only the traffic differs. A source that sends a unit or a
chunk that does not match is asked for no more units in this pull (so a lying source learns at most
two windows' worth of which units this node lacks: the next window is asked while one is assembled),
and the chunk is fetched whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from cachepoint.blocks import decode_verified, size_problem
from cachepoint.chunking import UNIT_DIGEST_SIZE, pack_mask, unit_count, unit_digests
from cachepoint.errors import BlockCorrupt
from cachepoint.ids import BlockId
from cachepoint.model import Chunking, Manifest, VersionInfo
from cachepoint.replication.assembly import Assembler, Received, Window
from cachepoint.replication.fetcher import STALL_SECONDS
from cachepoint.replication.ratelimit import TokenBucket
from cachepoint.replication.seed import Place, Seed, SeedLoader
from cachepoint.replication.sources import Part, Source, SourceClass
from cachepoint.store.store import Store
from cachepoint.store.units import encode_record

log = logging.getLogger("cachepoint.replication")

UNIT_WINDOW = 512  # chunks per units request: ~1-4 MiB of answers for 32-64 KiB chunks
DIGESTS_AHEAD = 1  # windows whose digests are asked before the units of the window before are
WHOLE_SHARE = 0.75  # a chunk with this share of its units missing here is asked for whole
ProgressFn = Callable[[int, int], None]
RoomFn = Callable[[int], None]


@dataclass
class UnitFetchResult:
    chunks: int = 0  # chunks assembled from units and stored
    units_local: int = 0  # units of those taken from chunks held here (or fetched once for several)
    units_fetched: int = 0  # units received
    bytes: int = 0  # bytes received: unit digests, units, and whole blocks from a server without units
    whole_blocks: int = 0  # whole blocks a server without unit fetch sent instead (verified, kept)
    bad_chunks: int = 0  # chunks whose units or assembled bytes did not match: fetched whole instead
    indexed: int = 0  # chunks held here whose unit digests were made from their bytes for this pull
    left: int = 0  # chunks left to the whole-block fetch

    def as_json(self) -> dict[str, int]:
        return {
            "chunks": self.chunks,
            "units_local": self.units_local,
            "units_fetched": self.units_fetched,
            "bytes": self.bytes,
            "whole_blocks": self.whole_blocks,
            "bad_chunks": self.bad_chunks,
            "indexed": self.indexed,
            "left_to_whole_fetch": self.left,
        }


class UnitFetch:
    def __init__(
        self,
        store: Store,
        source: Source,
        unit: int,
        layer: str,
        *,
        stall: float,
        block_size: int,
        progress: ProgressFn | None = None,
        room: RoomFn | None = None,
        bucket: TokenBucket | None = None,
        seeding: SeedLoader | None = None,
        logged: bool = True,
    ) -> None:
        """``seeding``: the seed, already being placed (pull starts it with the manifest); by
        default one is started here. ``logged``: as the Fetcher's."""
        self.store = store
        self.source = source
        self.unit = unit
        self.layer = layer
        self.stall = stall
        self.block_size = block_size
        self.progress = progress
        self.room = room
        self.bucket = bucket
        self.logged = logged
        self.result = UnitFetchResult()
        self.done: set[bytes] = set()
        self._total = 0
        self._stop = ""  # why no more units are asked of the source in this pull
        self._digests: dict[bytes, bytes] = {}
        self._seeding = seeding
        self._seed = seeding.seed if seeding is not None else Seed(store, unit)
        self._assembler = Assembler(unit, block_size, self._digests, self._seed)

    async def fetch(self, lengths: dict[bytes, int], version: str) -> set[bytes]:
        """Fetch the chunks ``lengths`` names (id -> length) by units; returns the ids now stored."""
        self._total = len(lengths)
        seeding = self._seeding
        if seeding is None:  # placing the seed the assembler reads
            seeding = SeedLoader(self._seed, self.layer)
        try:
            await self._fetch(seeding, lengths, version)
        finally:
            if self._seeding is None:  # its own: the pull closes the one it gave
                await seeding.close()
        self.result.left = len(lengths) - len(self.done)
        if self._stop:
            log.info("unit fetch from %s stopped: %s", self.source.name, self._stop)
        return self.done

    async def _fetch(self, seeding: SeedLoader, lengths: dict[bytes, int], version: str) -> None:
        await seeding.listed.wait()
        if not seeding.found:  # nothing here to take units from: whole chunks cost less
            await seeding.loaded()  # (or the catalog could not say: raised here)
            return
        ids = list(lengths)
        windows = [ids[start : start + UNIT_WINDOW] for start in range(0, len(ids), UNIT_WINDOW)]
        ready: asyncio.Queue[asyncio.Task[list[bytes]] | None] = asyncio.Queue()
        ahead = asyncio.Semaphore(DIGESTS_AHEAD)
        # The seed is placed while the first windows' digests are on their way.
        asking = asyncio.create_task(self._digest_windows(windows, lengths, version, ready, ahead))
        try:
            await seeding.loaded()
            self.result.indexed = self._seed.indexed
            await self._fetch_units(ready, ahead, lengths, version)
        finally:
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            while not ready.empty():  # digest calls asked but no longer wanted
                if (unwanted := ready.get_nowait()) is not None:
                    unwanted.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await unwanted

    # -- 1. the unit digests, window by window ---------------------------------------------------

    async def _digest_windows(
        self,
        windows: list[list[bytes]],
        lengths: dict[bytes, int],
        version: str,
        ready: asyncio.Queue[asyncio.Task[list[bytes]] | None],
        ahead: asyncio.Semaphore,
    ) -> None:
        """Ask for each window's digests, at most DIGESTS_AHEAD windows ahead of the one whose units
        are asked (a bound on memory), handing the calls on in order; None ends them."""
        try:
            for ids in windows:
                await ahead.acquire()
                if self._stop:
                    break
                ready.put_nowait(asyncio.create_task(self._ask_digests(ids, lengths, version)))
        finally:
            ready.put_nowait(None)

    async def _ask_digests(self, ids: list[bytes], lengths: dict[bytes, int], version: str) -> list[bytes]:
        """The ids of ``ids`` whose unit digests arrived; an old server's whole blocks are kept as they
        come."""
        try:
            async for parts in self.source.fetch_parts(ids, self.unit, None, self.stall, version):
                await self._pay(parts)
                whole = [part for part in parts if part.whole]
                if whole:
                    self._stop = "it answers with whole blocks (no unit fetch)"
                    await self._keep_whole(whole, lengths)
                for part in parts:
                    length = lengths.get(part.id)
                    expected = UNIT_DIGEST_SIZE * unit_count(length or 0, self.unit)
                    if part.unit_digests and length and len(part.unit_digests) == expected:
                        self._digests[part.id] = part.unit_digests
        except (grpc.RpcError, TimeoutError) as err:
            self._stop = f"unit digests: {_why(err)}"
        return [chunk for chunk in ids if chunk in self._digests]

    # -- 2. the units, window by window ----------------------------------------------------------

    async def _fetch_units(
        self,
        ready: asyncio.Queue[asyncio.Task[list[bytes]] | None],
        ahead: asyncio.Semaphore,
        lengths: dict[bytes, int],
        version: str,
    ) -> None:
        """Per window: its units asked while the window before is assembled (a window reads the
        chunks the one before stored, so assemblies take turns)."""
        assembling: asyncio.Task[None] | None = None
        try:
            while (asked := await ready.get()) is not None:
                ids = await asked
                ahead.release()
                if self._stop:
                    break
                window = self._plan([chunk for chunk in ids if chunk not in self.done])
                await self._ask(window, version)
                # The answer's units are checked while the window before is assembled: that needs
                # nothing of the store, and the pull's cores were half idle while windows took turns.
                receiving = asyncio.create_task(asyncio.to_thread(self._assembler.received, window, lengths))
                if assembling is not None:
                    try:
                        await assembling
                    except BaseException:
                        await asyncio.gather(receiving, return_exceptions=True)
                        raise
                assembling = asyncio.create_task(self._assemble(window, lengths, receiving))
        finally:
            if assembling is not None:
                await assembling

    def _plan(self, ids: list[bytes]) -> Window:
        """Where each unit of ``ids`` comes from: a place held here, or this window's answer (the first
        chunk that needs a unit not held here fetches it; later ones take it from that chunk)."""
        window = Window(ids)
        where, held = self._seed.where, self._seed.held
        for chunk in ids:
            packed = self._digests[chunk]
            plan: list[Place | None] = []
            fetch: list[int] = []
            for index in range(len(packed) // UNIT_DIGEST_SIZE):
                digest = packed[index * UNIT_DIGEST_SIZE : (index + 1) * UNIT_DIGEST_SIZE]
                place = where.get(digest) or held(digest)
                if place is None:
                    where[digest] = (chunk, index)
                    fetch.append(index)
                plan.append(place)
            window.plans[chunk] = plan
            if fetch:
                window.fetch[chunk] = fetch
        return window

    async def _ask(self, window: Window, version: str) -> None:
        if not window.fetch:
            return
        ids = list(window.fetch)
        # An empty mask asks for the whole chunk as stored: for a chunk mostly missing here it costs at
        # most a quarter more bytes, and its stored value is kept as it comes (no decoding and no
        # recompression on either side; on the benchmark's image +1.2% bytes, a fifth less CPU).
        masks = [
            b"" if len(window.fetch[c]) >= WHOLE_SHARE * len(window.plans[c]) else pack_mask(window.fetch[c])
            for c in ids
        ]
        try:
            async for parts in self.source.fetch_parts(ids, self.unit, masks, self.stall, version):
                await self._pay(parts)
                for part in parts:
                    if part.id in window.fetch and not part.unit_digests:
                        window.received[part.id] = part
        except (grpc.RpcError, TimeoutError) as err:
            self._stop = f"units: {_why(err)}"

    async def _assemble(
        self, window: Window, lengths: dict[bytes, int], receiving: asyncio.Task[Received]
    ) -> None:
        """Store the window's chunks, made of the units ``receiving`` checked and of units held here."""
        fetched, whole, bad = await receiving
        # Two halves at once: zstd and SHA-256 release the GIL, and assembly is the pull's main cost.
        half = (len(window.ids) + 1) // 2
        halves = await asyncio.gather(
            *(
                asyncio.to_thread(self._assembler.assembled, window, ids, lengths, fetched, whole)
                for ids in (window.ids[:half], window.ids[half:])
                if ids
            )
        )
        good = [item for stored, _, _ in halves for item in stored]
        failed = [chunk for _, lost, _ in halves for chunk in lost]
        bad += [why for _, _, whys in halves for why in whys]
        for chunk in failed:
            self._seed.forget(chunk, self._digests[chunk])
        if bad:
            self.result.bad_chunks += len(bad)
            self.source.counters.failures += 1
            log.warning(
                "source %s (%s) sent %d chunks' units that do not match, e.g. %s: fetching them whole",
                self.source.name,
                self.source.address,
                len(bad),
                bad[0],
            )
            self._stop = f"it sent units that do not match: {bad[0]}"
        if not good:
            return
        size = sum(len(value) for _, value, _ in good)
        if self.room is not None:
            await asyncio.to_thread(self.room, size)  # what it raises ends the pull (as the fetcher's)
        await asyncio.to_thread(
            self.store.blocks.put_fetched,
            [(chunk, value) for chunk, value, _ in good],
            [(chunk, record) for chunk, _, record in good],
            logged=self.logged,
        )
        fetched_units = sum(len(window.fetch.get(chunk, ())) for chunk, _, _ in good)
        units = sum(len(window.plans[chunk]) for chunk, _, _ in good)
        self.result.chunks += len(good)
        self.result.units_fetched += fetched_units
        self.result.units_local += units - fetched_units
        self.source.counters.blocks += len(good)
        self.done.update(chunk for chunk, _, _ in good)
        if self.progress is not None:
            self.progress(len(self.done), self._total)

    # -- whole blocks, from a source without unit fetch --------------------------------------------

    async def _keep_whole(self, parts: list[Part], lengths: dict[bytes, int]) -> None:
        good, records, problems = await asyncio.to_thread(self._verify_whole, parts, lengths)
        if problems:
            self.result.bad_chunks += len(problems)
            log.warning("source %s sent blocks that do not match, e.g. %s", self.source.name, problems[0])
        if not good:
            return
        if self.room is not None:
            await asyncio.to_thread(self.room, sum(len(value) for _, value in good))
        await asyncio.to_thread(self.store.blocks.put_fetched, good, records, logged=self.logged)
        self.result.whole_blocks += len(good)
        self.source.counters.blocks += len(good)
        self.done.update(chunk for chunk, _ in good)
        if self.progress is not None:
            self.progress(len(self.done), self._total)

    def _verify_whole(
        self, parts: list[Part], lengths: dict[bytes, int]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[str]]:
        good, records, problems = [], [], []
        for part in parts:
            if part.id not in lengths or part.id in self.done:
                continue
            if problem := size_problem(part.value, self.block_size):
                problems.append(f"block {BlockId(part.id)} is refused: {problem}")
                continue
            try:
                data = decode_verified(part.id, part.value, self.block_size)
            except BlockCorrupt as err:
                problems.append(str(err))
                continue
            good.append((part.id, part.value))
            records.append((part.id, encode_record(self.unit, unit_digests(data, self.unit))))
        return good, records, problems

    async def _pay(self, parts: list[Part]) -> None:
        size = sum(len(part.value) + len(part.unit_digests) for part in parts)
        self.result.bytes += size
        self.source.counters.bytes += size
        if self.bucket is not None:
            await self.bucket.pay(size)


def unit_source(sources: list[Source]) -> Source | None:
    """The source a unit fetch asks: the nearest complete holder of the version (a site peer, else
    another peer, else the origin). None while the site shares the version's fetch among its pullers:
    each new chunk then crosses the WAN once for the whole site, which a unit fetch per node, however
    much smaller, would not keep."""
    if any(source.puller for source in sources):
        return None
    holders = [source for source in sources if source.alive and not source.holds]
    return min(holders, key=lambda source: source.source_class, default=None)


async def fetch_by_units(
    store: Store,
    manifest: Manifest,
    missing: list[bytes],
    sources: list[Source],
    info: VersionInfo,
    progress: ProgressFn | None,
    limits: dict[SourceClass, float] | None,
    room: RoomFn | None,
    seeding: SeedLoader | None = None,
    logged: bool = True,
) -> tuple[UnitFetchResult, set[bytes]] | None:
    """The missing chunks of a content-chunked version that a unit fetch assembled (docs/design.md
    "Unit fetch"), and its counters; None when it does not apply. ``seeding``: its seed, started
    early by the caller (who closes it). ``logged``: as the Fetcher's."""
    source = unit_source(sources)
    if manifest.chunking != Chunking.CONTENT or not missing or source is None:
        return None
    lengths = chunk_lengths(manifest, set(missing))
    rate = (limits or {}).get(source.source_class, 0)
    fetch = UnitFetch(
        store,
        source,
        manifest.unit_size,
        info.layer,
        stall=STALL_SECONDS,
        block_size=manifest.block_size,
        progress=progress,
        room=room,
        bucket=TokenBucket(rate) if rate > 0 else None,
        seeding=seeding,
        logged=logged,
    )
    done = await fetch.fetch(lengths, info.ref)
    return fetch.result, done


def chunk_lengths(manifest: Manifest, ids: set[bytes]) -> dict[bytes, int]:
    """The length of each chunk of ``ids``, from the manifest's extent index."""
    lengths: dict[bytes, int] = {}
    for entry in manifest.entries:
        if not entry.chunked:
            continue
        ends = entry.ends()
        for index, digest in enumerate(entry.digests()):
            if digest in ids and digest not in lengths:
                lengths[digest] = ends[index] - (ends[index - 1] if index else 0)
    return lengths


def _why(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    if isinstance(err, TimeoutError):
        return "stalled"
    return str(err)
