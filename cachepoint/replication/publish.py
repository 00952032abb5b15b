"""Publish: ingest locally, send the coordinator only the blocks it lacks, then commit there.

The local store records the coordinator's version (its number and metadata), so the next publish of
the layer starts from it and its xxh3 pre-filter skips the unchanged blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachepoint.errors import RemoteRefused
from cachepoint.ids import BlockId
from cachepoint.layers.ingest import IngestOptions, IngestResult, ProgressFn, default_author, prepare
from cachepoint.model import VersionInfo
from cachepoint.rpc import channel
from cachepoint.rpc.channel import BATCH_BYTES, MAX_HAS_IDS
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2, catalog_pb2_grpc
from cachepoint.wire import manifest_digest, stored_block_to_pb, version_from_pb

PUSH_DEADLINE = 3600.0


@dataclass
class PublishResult:
    version: VersionInfo
    ingest: IngestResult
    blocks_sent: int
    bytes_sent: int

    def as_json(self) -> dict[str, object]:
        data = self.ingest.as_json()
        data.update(
            {
                "layer": self.version.layer,
                "version": self.version.number,
                "ref": self.version.ref,
                "digest": self.version.digest_text,
                "parent": self.version.parent or None,
                "blocks_sent": self.blocks_sent,
                "bytes_sent": self.bytes_sent,
            }
        )
        return data


async def missing_at(stub: blocks_pb2_grpc.BlockExchangeStub, ids: list[bytes]) -> list[bytes]:
    missing = []
    for start in range(0, len(ids), MAX_HAS_IDS):
        chunk = ids[start : start + MAX_HAS_IDS]
        response = await stub.HasBlocks(
            blocks_pb2.HasBlocksRequest(ids=b"".join(chunk)), timeout=UNARY_DEADLINE
        )
        bitmap = response.present
        missing += [
            d for i, d in enumerate(chunk) if not (i // 8 < len(bitmap) and bitmap[i // 8] >> (i % 8) & 1)
        ]
    return missing


async def _batches(store: Store, ids: list[bytes], sent: list[int]) -> AsyncIterator[blocks_pb2.BlockBatch]:
    """Stored values as they are (already compressed), ~1 MiB per message."""
    batch, size = blocks_pb2.BlockBatch(), 0
    for start in range(0, len(ids), 16):
        chunk = ids[start : start + 16]
        values = await asyncio.to_thread(store.blocks.raw_many, chunk)
        for digest, value in zip(chunk, values, strict=True):
            if value is None:
                raise RemoteRefused(
                    "local store", "MISSING", f"block {BlockId(digest)} vanished before the push"
                )
            batch.blocks.append(stored_block_to_pb(digest, value))
            size += len(value)
            sent[0] += 1
            sent[1] += len(value)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = blocks_pb2.BlockBatch(), 0
    if batch.blocks:
        yield batch


async def push_blocks(store: Store, coordinator: grpc.aio.Channel, ids: list[bytes]) -> tuple[int, int]:
    """Send the blocks the coordinator lacks; returns (blocks, stored bytes) sent."""
    stub = blocks_pb2_grpc.BlockExchangeStub(coordinator)
    missing = await missing_at(stub, ids)
    sent = [0, 0]
    if missing:
        response = await stub.PushBlocks(_batches(store, missing, sent), timeout=PUSH_DEADLINE)
        if response.rejected:
            raise RemoteRefused(
                "coordinator", "DATA_LOSS", f"{len(response.rejected) // 32} blocks failed verification"
            )
    return sent[0], sent[1]


async def publish(
    store: Store,
    path: Path | str,
    options: IngestOptions,
    coordinator: str,
    progress: ProgressFn | None = None,
) -> PublishResult:
    prepared = await asyncio.to_thread(prepare, store, path, options, progress)
    committed = False
    try:
        async with channel.channel(coordinator) as ch:
            blocks, size = await push_blocks(store, ch, sorted(prepared.manifest.block_ids()))
            request = catalog_pb2.CommitRequest(
                layer=options.layer,
                kind=int(options.kind),
                manifest=catalog_pb2.ManifestBlob(
                    digest=manifest_digest(prepared.manifest_bytes),
                    manifest=prepared.manifest_bytes,
                ),
                author=options.author or default_author(),
                device=options.device,
                message=options.message,
                tags=list(options.tags),
            )
            info = version_from_pb(
                await catalog_pb2_grpc.CatalogStub(ch).Commit(request, timeout=UNARY_DEADLINE)
            )
        pending = PendingCommit(prepared.manifest_bytes, prepared.prefilter, prepared.pins.ingest_id)
        await asyncio.to_thread(store.catalog.import_version, info, pending, options.tags)
        committed = True
    except grpc.RpcError as err:
        raise from_rpc_error(err, coordinator) from err
    finally:
        prepared.release(store, committed)
    result = prepared.result
    result.version = info
    result.seconds = time.monotonic() - prepared.started
    return PublishResult(info, result, blocks, size)
