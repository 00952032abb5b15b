"""Fetch missing blocks from several sources at once, nearest first, verifying every block.

The missing ids are cut into units. Each source runs a few streams; a stream takes the next unit it
is *eligible* for: a unit goes to the nearest class of sources that is still alive and has not
already said it lacks the unit, so the origin is asked only for what no peer could give. A unit that
comes back short is re-queued for the next class. A source that stalls past the deadline, fails, or
sends a block whose bytes do not hash to its id, or a block larger than the layer's block size, is
dropped and its unit re-planned. A source at its limit of streams for this peer (RESOURCE_EXHAUSTED,
cachepoint/rpc/guards.py) is busy, not broken: the unit goes back unblamed and the stream asks again
after a pause, BUSY_RETRIES times in a row at most. Verified blocks are written with the WAL on as
they arrive, so a killed pull keeps them and asks again only for the units that were in flight.
``room``, when given, is asked before each write whether the disk can take the batch (the daemon's
min_free, cachepoint/replication/gate.py); when it raises, every stream stops and the fetch raises
that error.

Site fan-out (docs/design.md): given ``node_id`` and sources marked ``puller`` (site peers pulling the
same version now), each missing block has an owner by rendezvous hashing over this node and the
pullers. Units of this node's share go to the usual sources (complete holders, then the origin); a
unit another puller owns is asked of that puller only, again and again while it lacks the blocks,
until the owner has gone SHARE_STALL_SECONDS without delivering a block while it was waited for: then
it is dropped and its share is split again over the pullers that remain (this node included, which
takes its part from the origin).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from cachepoint.blocks import MAX_BLOCK_SIZE, decode_verified, size_problem
from cachepoint.chunking import unit_digests
from cachepoint.errors import BlockCorrupt, PullIncomplete
from cachepoint.ids import BlockId
from cachepoint.replication import rendezvous
from cachepoint.replication.arrivals import BlockArrivals
from cachepoint.replication.ratelimit import TokenBucket
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.rpc.guards import BUSY_KEY
from cachepoint.store.store import Store
from cachepoint.store.units import encode_record

log = logging.getLogger("cachepoint.replication")

UNIT_BLOCKS = 64  # ~2-4 MiB of raw data per request: enough to stream, small enough to spread
STREAMS_PER_SOURCE = 2
STALL_SECONDS = 10.0
BUSY_PAUSE = 0.25  # seconds before asking a busy source again, times the refusals in a row
BUSY_RETRIES = 12  # refusals in a row (~20 s of pauses) before a busy source is dropped
# An owner of a share is asked to hold the call open this long for the blocks it is still fetching
# (FetchBlocksRequest.wait_ms, cachepoint/replication/arrivals.py): they come as it stores them. Below
# STALL_SECONDS, the longest a stream may go without a message.
OWNER_WAIT = 5.0
# An owner that sent none of what it was asked for (it had not started its own fetch yet, or it does
# not hold calls open) is asked again after this pause.
OWNER_POLL = 0.2
SHARE_STALL_SECONDS = 15.0  # an owner that delivers nothing for this long has its share taken over
# ... when this node's own fetches across the WAN delivered within that time. Without that evidence the
# WAN may be down for the whole site (a cut link): every owner stalls at once, and taking their shares
# over would fetch each of them a second time once the link returns. A hung owner then waits longer.
BLIND_TAKE_OVER = 4.0
# Verifying and writing received batches: two threads keep up with any WAN link (one verifies ~700
# MiB/s of blocks, RocksDB serialises the writes anyway), where the loop's default pool would run a
# thread per stream and make them take turns on the same cores.
_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch-writer")
ProgressFn = Callable[[int, int], None]
RoomFn = Callable[[int], None]  # raises when the disk cannot take that many more bytes
KeepFn = Callable[[list[tuple[bytes, bytes]]], None]  # takes verified (id, stored value) pairs


@dataclass
class _Unit:
    ids: list[bytes]
    tried: set[str] = field(default_factory=set)  # sources that lacked these ids or failed on them
    owner: str = ""  # the puller that fetches these from the WAN for the site; "" this node


@dataclass
class FetchResult:
    blocks: int = 0
    bytes: int = 0
    bad_blocks: int = 0


def _verify(
    values: list[tuple[bytes, bytes]], block_size: int, unit: int = 0
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
    """(good blocks, bad ones with why, and with ``unit`` the good ones' unit digest records: content
    chunks a later pull can take units from, cachepoint/store/units.py)."""
    good, bad, records = [], [], []
    for digest, value in values:
        if problem := size_problem(value, block_size):  # before hashing or keeping a byte of it
            bad.append((digest, f"block {BlockId(digest)} is refused: {problem}"))
            continue
        try:
            data = decode_verified(digest, value, block_size)
            good.append((digest, value))
            if unit:
                records.append((digest, encode_record(unit, unit_digests(data, unit))))
        except BlockCorrupt as err:
            bad.append((digest, str(err)))
    return good, bad, records


def _busy(err: grpc.RpcError) -> bool:
    """A refusal for the source's limit of streams per peer (not a full disk, not an oversized message)."""
    if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any(key == BUSY_KEY for key, _ in err.trailing_metadata() or ())


class Fetcher:
    def __init__(
        self,
        store: Store,
        sources: list[Source],
        progress: ProgressFn | None = None,
        stall: float = STALL_SECONDS,
        limits: dict[SourceClass, float] | None = None,
        room: RoomFn | None = None,
        block_size: int = MAX_BLOCK_SIZE,
        keep: KeepFn | None = None,
        node_id: str = "",
        share_stall: float = SHARE_STALL_SECONDS,
        unit_size: int = 0,
        arrivals: BlockArrivals | None = None,
        logged: bool = True,
    ) -> None:
        """``block_size``: the layer's, when the blocks are a version's; larger blocks are refused.
        ``logged``: blocks are written with the WAL; False: once, without it, for a caller that
        persists them before its version commits (BlockStore.put_fetched).
        ``unit_size``: the version's chunk unit when it is content-chunked (each chunk is stored with
        its unit digests, for the unit fetch of a later version).
        ``keep``: given each batch of verified blocks (on the event loop) instead of the store (a
        lazy read's TieredSource, whose caller writes them back). ``node_id``: this node's, for the
        rendezvous with the sources marked ``puller`` (ignored without them). ``arrivals``: where
        this node's FetchBlocks calls held open by site peers learn of each block as it is stored."""
        self.store = store
        self.keep = keep
        self.logged = logged
        self.block_size = block_size
        self.unit_size = unit_size
        self.room = room
        self._version = ""
        self._halt: Exception | None = None  # what ``room`` raised: no stream takes more work
        self._unwritten = 0  # bytes of batches checked by ``room`` and not yet written
        # Bytes per second per class of source (e.g. the WAN: peers of other sites and the origin).
        self.buckets = {cls: TokenBucket(rate) for cls, rate in (limits or {}).items() if rate > 0}
        self.sources = sorted(sources, key=lambda s: s.source_class)
        self.progress = progress
        self.stall = stall
        self.result = FetchResult()
        self._queue: list[_Unit] = []
        self._wanted: set[bytes] = set()
        self._inflight = 0
        self._changed = asyncio.Condition()
        self.node_id = node_id
        self.share_stall = share_stall
        self._pullers = {s.name: s for s in self.sources if s.puller} if node_id else {}
        # Per owner: when it last delivered a block (or the fetch began), and when to ask it again.
        self._delivered_at: dict[str, float] = {}
        self._ask_again_at: dict[str, float] = {}
        self._wan_at = 0.0  # when a source across the WAN (not of this site) last delivered
        self.arrivals = arrivals

    def _eligible(self, unit: _Unit, source: Source, now: float = 0.0) -> bool:
        if source.name in unit.tried or not source.alive:
            return False
        if unit.owner:  # another puller's share: only from it, and not before it is due again
            return source.name == unit.owner and now >= self._ask_again_at.get(unit.owner, 0.0)
        if source.puller:
            return False
        # Only when every nearer live source has already failed this unit (pullers hold only their share).
        return all(
            other.name in unit.tried or not other.alive
            for other in self.sources
            if other.source_class < source.source_class and not other.puller
        )

    def _stuck(self) -> bool:
        """No unit in flight and none that any live source may still take."""
        return self._inflight == 0 and not any(
            u.owner or any(self._eligible(u, s) for s in self.sources) for u in self._queue
        )

    def _units(self, ids: list[bytes], tried: set[str] | None = None) -> list[_Unit]:
        """``ids`` cut into units, by owner when the site shares the fetch (live pullers only)."""
        owners = [self.node_id, *(name for name, s in self._pullers.items() if s.alive)]
        groups = rendezvous.split(ids, owners) if len(owners) > 1 else {self.node_id: ids}
        return [
            _Unit(group[i : i + UNIT_BLOCKS], set(tried or ()), "" if owner == self.node_id else owner)
            for owner, group in groups.items()
            for i in range(0, len(group), UNIT_BLOCKS)
        ]

    def _take_over(self, now: float) -> None:
        """Drop owners that stalled; split the shares of owners gone (dropped) over those that remain."""
        waited = {unit.owner for unit in self._queue if unit.owner}
        wan_works = now - self._wan_at <= self.share_stall
        deadline = self.share_stall if wan_works else self.share_stall * BLIND_TAKE_OVER
        for name in waited:
            source = self._pullers[name]
            if source.alive and now - self._delivered_at.get(name, now) > deadline:
                self._drop(source, f"delivered none of its share for {deadline:.0f}s")
        orphans = [unit for unit in self._queue if unit.owner and not self._pullers[unit.owner].alive]
        if orphans:
            self._queue = [unit for unit in self._queue if unit not in orphans]
            for unit in orphans:
                self._queue += self._units(unit.ids, unit.tried)

    async def _take(self, source: Source) -> _Unit | None:
        async with self._changed:
            while True:
                if not self._wanted or not source.alive or self._halt is not None:
                    return None
                now = time.monotonic()
                if self._pullers:
                    self._take_over(now)
                for index, unit in enumerate(self._queue):
                    if self._eligible(unit, source, now):
                        self._inflight += 1
                        return self._queue.pop(index)
                if self._stuck():
                    self._changed.notify_all()
                    return None
                # Waiting for an owner to have more of its share is waiting for time, not an event.
                polling = any(unit.owner for unit in self._queue)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), OWNER_POLL if polling else None)

    async def _give_back(self, unit: _Unit, source: Source, blame: bool = True) -> None:
        async with self._changed:
            self._inflight -= 1
            rest = [d for d in unit.ids if d in self._wanted]
            if rest:
                if unit.owner and source.alive:  # the owner has not fetched these yet: ask it again soon
                    blame = False
                    if len(rest) == len(unit.ids):
                        self._ask_again_at[unit.owner] = time.monotonic() + OWNER_POLL
                unit.ids = rest
                if blame:
                    unit.tried.add(source.name)
                self._queue.append(unit)
            self._changed.notify_all()

    def _drop(self, source: Source, why: str) -> None:
        if source.alive:
            source.dropped = why
            source.counters.failures += 1
            log.warning("dropping source %s (%s): %s", source.name, source.address, why)

    async def _stream(self, source: Source, total: int) -> None:
        busy = 0  # refusals in a row for the source's limit of streams per peer
        while (unit := await self._take(source)) is not None:
            bucket = self.buckets.get(source.source_class)
            blame = True
            try:
                wait = min(OWNER_WAIT, self.stall / 2) if unit.owner else 0.0
                async for values in source.fetch(unit.ids, self.stall, self._version, wait):
                    busy = 0
                    if bucket is not None:
                        await bucket.pay(sum(len(v) for _, v in values))
                    wanted = [v for v in values if v[0] in self._wanted]
                    stored = await self._verify_and_store(wanted)
                    if stored is None:
                        break  # no room: the fetch is halting
                    good, bad = stored
                    if good:
                        async with self._changed:
                            landed = []
                            for digest, value in good:
                                if digest in self._wanted:
                                    self._wanted.discard(digest)
                                    landed.append(digest)
                                    self.result.blocks += 1
                                    self.result.bytes += len(value)
                                    source.counters.blocks += 1
                                    source.counters.bytes += len(value)
                            if self.arrivals is not None:
                                self.arrivals.stored(landed)
                            if source.puller:
                                self._delivered_at[source.name] = time.monotonic()
                            elif source.source_class != SourceClass.SITE:
                                self._wan_at = time.monotonic()
                        if self.progress is not None:
                            self.progress(total - len(self._wanted), total)
                    if bad:
                        self.result.bad_blocks += len(bad)
                        log.warning(
                            "source %s sent %d corrupt blocks, e.g. %s", source.name, len(bad), bad[0][1]
                        )
                        source.sent_corrupt = True
                        self._drop(source, f"sent a corrupt block: {bad[0][1]}")
                        break
            except TimeoutError:
                self._drop(source, f"stalled for more than {self.stall:.0f}s")
            except grpc.RpcError as err:
                if _busy(err) and busy < BUSY_RETRIES:
                    busy += 1
                    blame = False
                else:
                    code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else "ERROR"
                    self._drop(
                        source, f"{code}: {err.details() if isinstance(err, grpc.aio.AioRpcError) else err}"
                    )
            finally:
                await self._give_back(unit, source, blame)
            if not blame:
                await asyncio.sleep(BUSY_PAUSE * busy)

    async def _verify_and_store(
        self, values: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, str]]] | None:
        """Verify a batch and write its good blocks (and their unit records), in one trip to a worker
        thread: (good, bad), or None when the fetch is halting (no room)."""
        if not values:
            return [], []
        if self.keep is not None:  # on the event loop: a lazy read's TieredSource
            good, bad, _ = await asyncio.to_thread(_verify, values, self.block_size, self.unit_size)
            if good:
                self.keep(good)
            return good, bad
        if self._halt is not None:
            return None
        size = sum(len(v) for _, v in values)
        # Counted before the check, so concurrent streams' checks also count this batch.
        self._unwritten += size
        try:
            loop = asyncio.get_running_loop()
            work = functools.partial(self._verify_and_write, values, self._unwritten)
            good, bad, refused = await loop.run_in_executor(_WRITERS, work)
        finally:
            self._unwritten -= size
        if refused is not None:
            async with self._changed:
                self._halt = refused
                self._changed.notify_all()
            return None
        return good, bad

    def _verify_and_write(
        self, values: list[tuple[bytes, bytes]], unwritten: int
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, str]], Exception | None]:
        """On a worker thread: (good, bad, what ``room`` raised, the good ones then unwritten)."""
        good, bad, records = _verify(values, self.block_size, self.unit_size)
        if good:
            if self.room is not None:
                try:
                    self.room(unwritten)
                except Exception as err:
                    return good, bad, err
            self.store.blocks.put_fetched(good, records, logged=self.logged)
        return good, bad, None

    async def fetch(self, missing: list[bytes], label: str, version: str = "") -> FetchResult:
        """``version``: the "LAYER@N" the blocks are of, named in every FetchBlocks request."""
        self._version = version
        unique = list(dict.fromkeys(missing))
        self._wanted = set(unique)
        self._queue = self._units(unique)
        started = time.monotonic()
        self._delivered_at = {name: started for name in self._pullers}
        self._wan_at = started
        total = len(unique)
        if total and self.room is not None:
            try:
                await asyncio.to_thread(self.room, 0)
            except Exception as err:
                self._halt = err
        if total and self._halt is None:
            streams = [
                self._stream(source, total) for source in self.sources for _ in range(STREAMS_PER_SOURCE)
            ]
            if self.arrivals is not None:
                self.arrivals.expect(unique)
            try:
                await asyncio.gather(*streams)
            finally:
                if self.arrivals is not None:
                    self.arrivals.forget(self._wanted)
        for source in self.sources:
            await source.close()
        if self._halt is not None:
            raise self._halt
        if self._wanted:
            reasons = (
                "; ".join(f"{s.name}: {s.dropped or 'did not have them'}" for s in self.sources)
                or "no sources"
            )
            first = BlockId(next(iter(self._wanted)))
            raise PullIncomplete(label, len(self._wanted), f"first missing {first}; sources: {reasons}")
        return self.result
