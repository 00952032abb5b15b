"""BlockExchange over a local store: every node serves its blocks; only an origin takes pushes.

FetchBlocks answers from a block source (cachepoint/blocksource; the store's by default) with stored
values as they are: the caller verifies each block against its id as it arrives, so the server does
not hash. Which ids a caller may learn of is decided before the source is asked (``answerable``,
cachepoint/rpc/block_access.py).

With ``unit_size`` (unit fetch, docs/design.md) a block is answered in part: its unit digests, or the
units its mask names, compressed together. Digests come from the ``units`` family when this store
keeps them (chunks that came from another machine), else from the decoded block (~30 us per 32 KiB
chunk, in a thread); recently decoded chunks are kept a while (DecodedChunks), so a chunk's digests
and then its units cost one decoding."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from cachepoint.blocks import (
    CODEC_LZ4,
    MAX_BLOCK_SIZE,
    decode_block,
    decode_verified,
    encode_block,
    size_problem,
)
from cachepoint.blocksource import BlockSource, StoreSource
from cachepoint.chunking import MAX_UNIT, mask_indexes, select_units, unit_count, unit_digests, valid_unit
from cachepoint.errors import BlockCorrupt, InvalidInput
from cachepoint.ids import DIGEST_SIZE, BlockId, unpack_ids
from cachepoint.replication.arrivals import BlockArrivals
from cachepoint.rpc.channel import BATCH_BYTES, MAX_FETCH_IDS, MAX_HAS_IDS
from cachepoint.rpc.errors import NotAnOrigin, rpc_errors
from cachepoint.rpc.streams import StreamSlots
from cachepoint.slots import SlotLimits
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from cachepoint.wire import stored_block_to_pb, stored_value_from_pb

READ_CHUNK = 16  # blocks read from the store per call while filling a batch
# Blocks answered in part per thread call: a unit answer is small (digests, a few units), so a larger
# batch costs little memory and saves the origin a thread round trip per 16 chunks.
UNIT_READ_CHUNK = 128
# A FetchBlocks call held open for blocks this node's pull is still fetching (wait_ms) lasts at most
# this long, below a caller's stall deadline (cachepoint/replication/fetcher.py), and looks this often
# whether another caller waits for a stream slot (then it ends, handing its slot over).
MAX_ARRIVAL_WAIT = 8.0
SLOT_LOOK = 0.5
# Decoded chunks kept for unit answers: a window and a half of 64 KiB chunks (three of 32 KiB ones); a
# chunk that left it before its units were asked is decoded again (~60 us), cheaper than keeping more
# memory for as long as the daemon runs.
DECODED_BYTES = 48 * 1024 * 1024
log = logging.getLogger("cachepoint.rpc")


@dataclass
class ServeCounters:
    blocks_served: int = 0
    bytes_served: int = 0
    blocks_received: int = 0
    blocks_rejected: int = 0


def checked_ids(packed: bytes, limit: int, what: str) -> list[bytes]:
    if len(packed) % DIGEST_SIZE:
        raise InvalidInput(f"{what}: ids must be packed {DIGEST_SIZE}-byte digests, got {len(packed)} bytes")
    count = len(packed) // DIGEST_SIZE
    if count > limit:
        raise InvalidInput(f"{what}: {count} ids in one request, the limit is {limit}")
    return unpack_ids(packed)


def _verify_batch(values: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Pushed blocks checked against their ids; one a node re-stored in lz4 (its disks read it again,
    cachepoint/blocksource/recode.py) is kept in zstd, as everything the origin keeps."""
    good, bad = [], []
    for digest, value in values:
        try:
            data = decode_verified(digest, value)
            good.append((digest, encode_block(data) if value[0] == CODEC_LZ4 else value))
        except BlockCorrupt:
            bad.append(digest)
    return good, bad


def checked_masks(request: blocks_pb2.FetchBlocksRequest, count: int) -> list[bytes]:
    """The unit masks of a FetchBlocks request, one per id, or none (a whole-block or digest request)."""
    unit, masks = request.unit_size, list(request.unit_masks)
    if unit and not valid_unit(unit):
        raise InvalidInput(f"FetchBlocks: unit_size {unit} is not a power of two from 512 to {MAX_UNIT}")
    if masks and not unit:
        raise InvalidInput("FetchBlocks: unit_masks without a unit_size")
    if masks and len(masks) != count:
        raise InvalidInput(f"FetchBlocks: {len(masks)} unit masks for {count} ids")
    longest = (MAX_BLOCK_SIZE // unit + 7) // 8 if unit else 0
    if any(len(mask) > longest for mask in masks):
        raise InvalidInput(f"FetchBlocks: a unit mask is over {longest} bytes (units of {unit})")
    return masks


class DecodedChunks:
    """Chunks decoded for a unit answer, the most recent up to DECODED_BYTES: a receiver asks for a
    window's unit digests, then for some of its units a moment later (docs/design.md "Unit fetch"), so
    the second answer finds the chunk decoded by the first. Shared by the threads answering calls."""

    def __init__(self, limit: int = DECODED_BYTES) -> None:
        self.limit = limit
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def decoded(self, digest: bytes, value: bytes) -> bytes:
        with self._lock:
            data = self._chunks.get(digest)
            if data is not None:
                self._chunks.move_to_end(digest)
                return data
        data = decode_block(value, MAX_BLOCK_SIZE)
        with self._lock:
            if digest not in self._chunks:
                self._chunks[digest] = data
                self._size += len(data)
                while self._size > self.limit:
                    self._size -= len(self._chunks.popitem(last=False)[1])
        return data


def unit_answer(
    digest: bytes, value: bytes, unit: int, mask: bytes | None, decoded: DecodedChunks | None = None
) -> blocks_pb2.StoredBlock | None:
    """A block answered in part: its unit digests (no mask) or the units ``mask`` names. None when the
    stored value cannot be decoded: left out, as a block not held (the caller fetches it elsewhere)."""
    try:
        data = decoded.decoded(digest, value) if decoded is not None else decode_block(value, MAX_BLOCK_SIZE)
    except Exception as err:  # undecodable here: never answered with made-up units
        log.warning("block %s cannot be decoded for a unit answer: %s", BlockId(digest), err)
        return None
    if mask is None:
        return blocks_pb2.StoredBlock(id=digest, unit_digests=unit_digests(data, unit))
    indexes = mask_indexes(mask)
    count = unit_count(len(data), unit)
    if indexes and indexes[-1] >= count:
        raise InvalidInput(
            f"FetchBlocks: the unit mask of block {BlockId(digest)} names unit {indexes[-1]}, "
            f"the block has {count}"
        )
    part = select_units(data, unit, indexes)
    encoded = encode_block(part)
    return blocks_pb2.StoredBlock(
        id=digest, codec=encoded[0], raw_size=len(part), payload=encoded[1:], partial=True
    )


def _unit_answers(
    ids: list[bytes],
    values: dict[bytes, bytes],
    unit: int,
    masks: dict[bytes, bytes] | None,
    records: dict[bytes, bytes],
    decoded: DecodedChunks,
) -> tuple[list[blocks_pb2.StoredBlock], list[tuple[bytes, int, bytes]]]:
    """The answers, and the unit records made for them. ``records``: unit digests this store keeps
    (chunks that came from another machine, or whose digests an earlier answer made), answered as
    they are, without decoding the chunk."""
    answers = []
    made: list[tuple[bytes, int, bytes]] = []
    for digest in ids:
        value = values.get(digest)
        if value is None:
            continue
        mask = None if masks is None else masks[digest]
        if mask is None and digest in records:
            answers.append(blocks_pb2.StoredBlock(id=digest, unit_digests=records[digest]))
        elif mask == b"":  # the whole block, as stored
            answers.append(stored_block_to_pb(digest, value))
        elif (answer := unit_answer(digest, value, unit, mask, decoded)) is not None:
            answers.append(answer)
            if mask is None:
                made.append((digest, unit, answer.unit_digests))
    return answers, made


# What a caller is answered about: (call, the version it names) -> the ids it may learn of, or None for
# every id (no TLS). See cachepoint/rpc/block_access.py.
Answerable = Callable[[grpc.aio.ServicerContext, str], frozenset[bytes] | None]


def answer_all(context: grpc.aio.ServicerContext, version: str) -> frozenset[bytes] | None:
    return None


class _Answer:
    """A FetchBlocks answer on its way out: messages of about BATCH_BYTES, each written once full
    (waiting for the caller's flow control, StreamSlots.write), every block counted as served."""

    def __init__(self, service: BlockExchangeService, context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.context = context
        self.batch = blocks_pb2.BlockBatch()
        self.size = 0

    async def add(self, block: blocks_pb2.StoredBlock, size: int) -> None:
        self.batch.blocks.append(block)
        self.size += size
        self.service.counters.blocks_served += 1
        self.service.counters.bytes_served += size
        if self.size >= BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.batch.blocks:
            await self.service.fetches.write(self.context, self.batch)
            self.batch, self.size = blocks_pb2.BlockBatch(), 0


class BlockExchangeService(blocks_pb2_grpc.BlockExchangeServicer):
    def __init__(
        self,
        store: Store,
        counters: ServeCounters,
        accepts_pushes: bool,
        fetch_limits: SlotLimits,
        answerable: Answerable = answer_all,
        source: BlockSource | None = None,
        arrivals: BlockArrivals | None = None,
    ) -> None:
        """``source``: what FetchBlocks serves (default: the store's own blocks). ``arrivals``: the
        blocks this node's shared pull is fetching, which a call with ``wait_ms`` may wait for."""
        self.store = store
        self.arrivals = arrivals
        self.source = source or StoreSource(store)
        self.counters = counters
        self.accepts_pushes = accepts_pushes
        self.fetches = StreamSlots("FetchBlocks", fetch_limits)
        self.answerable = answerable
        self.decoded = DecodedChunks()
        self.keeps_records = store.db.writable

    def _unit_answers(
        self, ids: list[bytes], unit: int, masks: dict[bytes, bytes] | None
    ) -> list[blocks_pb2.StoredBlock]:
        """The unit answers for ``ids`` held here (one thread's work: read, decode, hash). The unit
        digests made from a chunk's bytes are kept (the ``units`` family, derived state), so that the
        next node pulling the version, a moment later, is answered from them without decoding."""
        values = self.source.stored_many(ids)
        records = self.store.units.get_many([d for d in ids if d in values], unit) if masks is None else {}
        answers, made = _unit_answers(ids, values, unit, masks, records, self.decoded)
        if made and self.keeps_records:
            try:
                self.store.units.put_many(made)
            except Exception as err:  # a read-only or full store answers all the same
                self.keeps_records = False
                log.info("unit digests made for answers are not kept: %s", err)
        return answers

    @rpc_errors
    async def HasBlocks(  # noqa: N802 - gRPC method name
        self, request: blocks_pb2.HasBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.HasBlocksResponse:
        ids = checked_ids(request.ids, MAX_HAS_IDS, "HasBlocks")
        allowed = await asyncio.to_thread(self.answerable, context, request.version)

        def present_here() -> list[bool]:
            return [(allowed is None or d in allowed) and self.store.blocks.has(d) for d in ids]

        present = await asyncio.to_thread(present_here)
        if self.accepts_pushes:  # a publisher skips what is here: keep it until its commit comes
            self.store.note_received(d for d, here in zip(ids, present, strict=True) if here)
        bitmap = bytearray((len(ids) + 7) // 8)
        for index, here in enumerate(present):
            if here:
                bitmap[index // 8] |= 1 << (index % 8)
        return blocks_pb2.HasBlocksResponse(present=bytes(bitmap))

    @rpc_errors
    async def FetchBlocks(  # noqa: N802
        self, request: blocks_pb2.FetchBlocksRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write, not yielded: each batch is built only once the previous one
        # has been taken by flow control, and a caller that reads nothing is cut off (streams.py).
        await self.fetches.admit(context)
        ids = checked_ids(request.ids, MAX_FETCH_IDS, "FetchBlocks")  # after: a waiting call holds no list
        masks = checked_masks(request, len(ids))
        by_id = dict(zip(ids, masks, strict=True)) if masks else None
        allowed = await asyncio.to_thread(self.answerable, context, request.version)
        if allowed is not None:
            ids = [d for d in ids if d in allowed]  # the others are "missing": left out, as if not here
        if request.unit_size:
            await self._send_units(context, ids, request.unit_size, by_id)
            return
        # What this node's pull is still fetching, looked at before the store is read: a block stored
        # in between is then either read now or seen landing later, never neither.
        coming = self.arrivals.pending(ids) if request.wait_ms and self.arrivals is not None else set()
        sent = await self._send_held(context, ids)
        if coming - sent:
            await self._send_arriving(context, ids, coming - sent, request.wait_ms / 1000)

    async def _send_held(self, context: grpc.aio.ServicerContext, ids: list[bytes]) -> set[bytes]:
        """Stream the blocks of ``ids`` held here, as stored, in batches; the others are left out
        (the caller asks elsewhere). Returns the ids sent."""
        sent: set[bytes] = set()
        answer = _Answer(self, context)
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            values = await asyncio.to_thread(self.source.stored_many, chunk)
            for digest in chunk:
                value = values.get(digest)
                if value is None:
                    continue
                sent.add(digest)
                await answer.add(stored_block_to_pb(digest, value), len(value))
        await answer.flush()
        return sent

    async def _send_arriving(
        self, context: grpc.aio.ServicerContext, ids: list[bytes], coming: set[bytes], wait: float
    ) -> None:
        """Stream the blocks of ``coming`` (of ``ids``, in their order) that this node's pull stores
        within ``wait`` seconds, as each batch of it lands (cachepoint/replication/arrivals.py). Ends
        early when another caller waits for a stream slot."""
        assert self.arrivals is not None
        deadline = time.monotonic() + min(wait, MAX_ARRIVAL_WAIT)
        while True:
            # Landed since the last look (the first: while the held blocks were being sent).
            still = self.arrivals.pending(coming)
            if len(still) < len(coming):
                landed = coming - still
                await self._send_held(context, [d for d in ids if d in landed])
            coming = still
            left = deadline - time.monotonic()
            if not coming or left <= 0 or self.fetches.slots.waiting:
                return
            await self.arrivals.changed(min(left, SLOT_LOOK))

    async def _send_units(
        self, context: grpc.aio.ServicerContext, ids: list[bytes], unit: int, by_id: dict[bytes, bytes] | None
    ) -> None:
        """Unit fetch: each block held answered with its unit digests, or the units its mask names."""
        answer = _Answer(self, context)
        for start in range(0, len(ids), UNIT_READ_CHUNK):
            chunk = ids[start : start + UNIT_READ_CHUNK]
            for block in await asyncio.to_thread(self._unit_answers, chunk, unit, by_id):
                await answer.add(block, len(block.payload) + len(block.unit_digests))
        await answer.flush()

    @rpc_errors
    async def PushBlocks(  # noqa: N802
        self, request_iterator: AsyncIterator[blocks_pb2.BlockBatch], context: grpc.aio.ServicerContext
    ) -> blocks_pb2.PushBlocksResponse:
        if not self.accepts_pushes:
            raise NotAnOrigin()
        accepted = 0
        rejected: list[bytes] = []
        async for batch in request_iterator:
            values = []
            for block in batch.blocks:
                if len(block.id) != DIGEST_SIZE:
                    raise InvalidInput(
                        f"PushBlocks: a block id has {len(block.id)} bytes, expected {DIGEST_SIZE}"
                    )
                value = stored_value_from_pb(block)
                if problem := size_problem(value):  # no layer here: the largest block size bounds it
                    raise InvalidInput(f"PushBlocks: block {BlockId(block.id)} is refused: {problem}")
                values.append((block.id, value))
            good, bad = await asyncio.to_thread(_verify_batch, values)
            if good:
                await asyncio.to_thread(self.store.blocks.put_many, good, True)
                self.store.note_received(digest for digest, _ in good)
            accepted += len(good)
            rejected.extend(bad)
            self.counters.blocks_received += len(good)
            self.counters.blocks_rejected += len(bad)
        return blocks_pb2.PushBlocksResponse(accepted=accepted, rejected=b"".join(rejected))
