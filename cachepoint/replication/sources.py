"""Where blocks come from: site peers, other peers, the origin — each a Source with its counters.

Missing and corrupt are different outcomes (as in desync): a source that lacks a block simply
leaves it out and the block is asked of the next source; a source that sends bytes that do not hash
to their id is dropped for the rest of the pull, and the failure is counted and logged with both
digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from cachepoint.blocks import MAX_STORED_SIZE
from cachepoint.rpc import channel
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from cachepoint.wire import stored_value_from_pb

# A FetchBlocks batch is ~1 MiB of stored blocks and ends with the block that crossed that mark, so
# no honest batch exceeds BATCH_BYTES + one largest block; the margin covers the framing of up to
# MAX_FETCH_IDS blocks (~48 bytes each). A bigger message is refused by gRPC before it is kept.
FETCH_MAX_MESSAGE = channel.BATCH_BYTES + MAX_STORED_SIZE + 512 * 1024


@dataclass(frozen=True, slots=True)
class Part:
    """One answer of a unit fetch: a block's unit digests, the units asked for (``partial``: a stored
    value of their concatenation), or, from a server without unit fetch, the whole stored block."""

    id: bytes
    unit_digests: bytes
    value: bytes
    partial: bool

    @property
    def whole(self) -> bool:
        return not self.unit_digests and not self.partial


class SourceClass(enum.IntEnum):
    """Preference order: lower is nearer."""

    SITE = 0
    PEER = 1
    ORIGIN = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class SourceCounters:
    blocks: int = 0
    bytes: int = 0
    failures: int = 0


@dataclass
class Source:
    name: str
    address: str
    source_class: SourceClass
    counters: SourceCounters = field(default_factory=SourceCounters)
    dropped: str = ""  # why this source is no longer used in this pull
    sent_corrupt: bool = False  # it sent bytes that do not hash to their id: not to be trusted for a while
    node_origin: bool = False  # an origin that is a node of the fleet (`pull --from PEER`): checked as a peer
    # A peer that holds another version than the one pulled (its parent): named in its requests, as a
    # peer with TLS answers only for blocks of a version it holds (block_access.py).
    holds: str = ""
    # A site peer pulling the same version now: it holds only part of it, and is asked only for the
    # blocks it fetches across the WAN for the site (cachepoint/replication/rendezvous.py).
    puller: bool = False
    site: str = ""  # the peer's site, as the coordinator names it (metrics); empty for the origin
    _channel: grpc.aio.Channel | None = None

    @property
    def alive(self) -> bool:
        return not self.dropped

    def stub(self) -> blocks_pb2_grpc.BlockExchangeStub:
        if self._channel is None:
            self._channel = channel.channel(
                self.address,
                peer=self.source_class != SourceClass.ORIGIN or self.node_origin,
                max_receive=FETCH_MAX_MESSAGE,
            )
        return blocks_pb2_grpc.BlockExchangeStub(self._channel)

    async def fetch(
        self, ids: list[bytes], stall: float, version: str = "", wait: float = 0.0
    ) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Stream (id, stored value) batches; a gap longer than ``stall`` seconds raises TimeoutError.
        ``version`` ("LAYER@N"): the version the blocks are of (a server with TLS answers only for
        blocks of a version the caller may read). ``wait``: a puller of the same version may hold the
        call open that many seconds for blocks it is still fetching (FetchBlocksRequest.wait_ms)."""
        request = blocks_pb2.FetchBlocksRequest(
            ids=b"".join(ids), version=self.holds or version, wait_ms=round(wait * 1000)
        )
        # aclosing: a consumer that stops early cancels the call now, not when the collector runs.
        async with contextlib.aclosing(self._batches(request, stall)) as batches:
            async for batch in batches:
                yield [(block.id, stored_value_from_pb(block)) for block in batch.blocks]

    async def fetch_parts(
        self, ids: list[bytes], unit: int, masks: list[bytes] | None, stall: float, version: str = ""
    ) -> AsyncIterator[list[Part]]:
        """Unit fetch (docs/design.md): the unit digests of ``ids`` (no ``masks``), or the units each
        mask names. A server without unit fetch answers with whole blocks (``Part.whole``)."""
        request = blocks_pb2.FetchBlocksRequest(
            ids=b"".join(ids), version=self.holds or version, unit_size=unit, unit_masks=masks or ()
        )
        # aclosing: a consumer that stops early cancels the call now, not when the collector runs.
        async with contextlib.aclosing(self._batches(request, stall)) as batches:
            async for batch in batches:
                yield [_part(block) for block in batch.blocks]

    async def _batches(
        self, request: blocks_pb2.FetchBlocksRequest, stall: float
    ) -> AsyncIterator[blocks_pb2.BlockBatch]:
        """The FetchBlocks answer's batches; a gap longer than ``stall`` seconds raises TimeoutError."""
        call = self.stub().FetchBlocks(request)
        try:
            while True:
                # call.read(), not the call's async iterator under wait_for: that pattern keeps the
                # call in a reference cycle, and its connection open until the cyclic GC runs.
                batch = await asyncio.wait_for(call.read(), stall)
                if batch is grpc.aio.EOF:
                    return
                yield batch
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _part(block: blocks_pb2.StoredBlock) -> Part:
    value = b"" if block.unit_digests else stored_value_from_pb(block)
    return Part(block.id, block.unit_digests, value, block.partial)
