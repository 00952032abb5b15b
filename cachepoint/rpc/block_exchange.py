"""BlockExchange over a local store: every node serves its blocks; only an origin takes pushes.

FetchBlocks answers from a block source (cachepoint/blocksource; the store's by default) with stored
values as they are: the caller verifies each block against its id as it arrives, so the server does
not hash. Which ids a caller may learn of is decided before the source is asked (``answerable``,
cachepoint/rpc/block_access.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from cachepoint.blocks import decode_verified, size_problem
from cachepoint.blocksource import BlockSource, StoreSource
from cachepoint.errors import BlockCorrupt, InvalidInput
from cachepoint.ids import DIGEST_SIZE, BlockId, unpack_ids
from cachepoint.rpc.channel import BATCH_BYTES, MAX_FETCH_IDS, MAX_HAS_IDS
from cachepoint.rpc.errors import NotAnOrigin, rpc_errors
from cachepoint.rpc.streams import StreamSlots
from cachepoint.slots import SlotLimits
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from cachepoint.wire import stored_block_to_pb, stored_value_from_pb

READ_CHUNK = 16  # blocks read from the store per call while filling a batch


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
    good, bad = [], []
    for digest, value in values:
        try:
            decode_verified(digest, value)
            good.append((digest, value))
        except BlockCorrupt:
            bad.append(digest)
    return good, bad


# What a caller is answered about: (call, the version it names) -> the ids it may learn of, or None for
# every id (no TLS). See cachepoint/rpc/block_access.py.
Answerable = Callable[[grpc.aio.ServicerContext, str], frozenset[bytes] | None]


def answer_all(context: grpc.aio.ServicerContext, version: str) -> frozenset[bytes] | None:
    return None


class BlockExchangeService(blocks_pb2_grpc.BlockExchangeServicer):
    def __init__(
        self,
        store: Store,
        counters: ServeCounters,
        accepts_pushes: bool,
        fetch_limits: SlotLimits,
        answerable: Answerable = answer_all,
        source: BlockSource | None = None,
    ) -> None:
        """``source``: what FetchBlocks serves (default: the store's own blocks)."""
        self.store = store
        self.source = source or StoreSource(store)
        self.counters = counters
        self.accepts_pushes = accepts_pushes
        self.fetches = StreamSlots("FetchBlocks", fetch_limits)
        self.answerable = answerable

    @rpc_errors
    async def HasBlocks(  # noqa: N802 - gRPC method name
        self, request: blocks_pb2.HasBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.HasBlocksResponse:
        ids = checked_ids(request.ids, MAX_HAS_IDS, "HasBlocks")
        allowed = await asyncio.to_thread(self.answerable, context, request.version)

        def present_here() -> list[bool]:
            return [(allowed is None or d in allowed) and self.store.blocks.has(d) for d in ids]

        present = await asyncio.to_thread(present_here)
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
        allowed = await asyncio.to_thread(self.answerable, context, request.version)
        if allowed is not None:
            ids = [d for d in ids if d in allowed]  # the others are "missing": left out, as if not here
        batch = blocks_pb2.BlockBatch()
        size = 0
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            values = await asyncio.to_thread(self.source.stored_many, chunk)
            for digest in chunk:
                value = values.get(digest)
                if value is None:
                    continue  # not held here: left out, the caller asks elsewhere
                batch.blocks.append(stored_block_to_pb(digest, value))
                size += len(value)
                self.counters.blocks_served += 1
                self.counters.bytes_served += len(value)
                if size >= BATCH_BYTES:
                    await self.fetches.write(context, batch)
                    batch, size = blocks_pb2.BlockBatch(), 0
        if batch.blocks:
            await self.fetches.write(context, batch)

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
            accepted += len(good)
            rejected.extend(bad)
            self.counters.blocks_received += len(good)
            self.counters.blocks_rejected += len(bad)
        return blocks_pb2.PushBlocksResponse(accepted=accepted, rejected=b"".join(rejected))
