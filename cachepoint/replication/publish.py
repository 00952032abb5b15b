"""Publish: ingest locally, send the coordinator only the blocks it lacks, then commit there.

The local store records the coordinator's version (its number and metadata), so the next publish of
the layer starts from it and its xxh3 pre-filter skips the unchanged blocks.

Content the target tag already names at the coordinator makes no new version (unless ``allow_same``;
the rule is in ``cachepoint.layers.unchanged``). The client asks (Resolve each target tag, then
GetManifest only when the manifests' digests differ) before pushing anything: no wire change, and an
unchanged publish sends no block. Two publishers racing with the same content can both make a
version, as before; nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachepoint.errors import IntegrityFailure, RemoteRefused
from cachepoint.ids import LATEST, BlockId, Ref
from cachepoint.layers.ingest import (
    IngestOptions,
    IngestResult,
    PreparedVersion,
    ProgressFn,
    default_author,
    prepare,
)
from cachepoint.layers.unchanged import named_by_all, same_content, target_tags
from cachepoint.model import VersionInfo
from cachepoint.rpc import replicas
from cachepoint.rpc.channel import BATCH_BYTES, MAX_HAS_IDS
from cachepoint.rpc.client import UNARY_DEADLINE, from_rpc_error
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2, catalog_pb2_grpc
from cachepoint.wire import (
    manifest_digest,
    manifest_from_bytes,
    ref_to_pb,
    stored_block_to_pb,
    version_from_pb,
)

PUSH_DEADLINE = 3600.0


@dataclass
class PublishResult:
    version: VersionInfo
    ingest: IngestResult
    blocks_sent: int
    bytes_sent: int
    unchanged: bool = False  # ``version`` is the coordinator's existing one: nothing was committed

    def as_json(self) -> dict[str, object]:
        data = self.ingest.as_json()
        data.update(
            {
                "layer": self.version.layer,
                "version": self.version.number,
                "ref": self.version.ref,
                "digest": self.version.digest_text,
                "parent": self.version.parent or None,
                "unchanged": self.unchanged,
                "blocks_sent": self.blocks_sent,
                "bytes_sent": self.bytes_sent,
            }
        )
        return data


async def missing_at(
    stub: blocks_pb2_grpc.BlockExchangeStub, ids: list[bytes], version: str = ""
) -> list[bytes]:
    """The ids the server lacks. A server with TLS answers only for blocks of ``version``: naming the
    layer's latest version there keeps a new version's push to what changed since."""
    missing = []
    for start in range(0, len(ids), MAX_HAS_IDS):
        chunk = ids[start : start + MAX_HAS_IDS]
        response = await stub.HasBlocks(
            blocks_pb2.HasBlocksRequest(ids=b"".join(chunk), version=version), timeout=UNARY_DEADLINE
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


async def push_blocks(
    store: Store, coordinator: grpc.aio.Channel, ids: list[bytes], layer: str = ""
) -> tuple[int, int]:
    """Send the blocks the coordinator lacks; returns (blocks, stored bytes) sent. ``layer``: the
    layer the blocks are for (with TLS, the coordinator tells only of blocks of its latest version)."""
    stub = blocks_pb2_grpc.BlockExchangeStub(coordinator)
    missing = await missing_at(stub, ids, f"{layer}:{LATEST}" if layer else "")
    sent = [0, 0]
    if missing:
        response = await stub.PushBlocks(_batches(store, missing, sent), timeout=PUSH_DEADLINE)
        if response.rejected:
            raise RemoteRefused(
                "coordinator", "DATA_LOSS", f"{len(response.rejected) // 32} blocks failed verification"
            )
    return sent[0], sent[1]


async def unchanged_at(
    coordinator: grpc.aio.Channel, options: IngestOptions, prepared: PreparedVersion
) -> tuple[VersionInfo, bytes] | None:
    """The coordinator's version the target tags name and its manifest's bytes, if it has the
    prepared content; None when a tag names nothing there or the content differs."""
    stub = catalog_pb2_grpc.CatalogStub(coordinator)
    found: list[VersionInfo | None] = []
    for tag in target_tags(options.tags):
        request = catalog_pb2.ResolveRequest(ref=ref_to_pb(Ref(options.layer, tag=tag)))
        try:
            found.append(version_from_pb(await stub.Resolve(request, timeout=UNARY_DEADLINE)))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
            return None  # a new layer, or a tag not set yet
    existing = named_by_all(found)
    if existing is None:
        return None
    if existing.manifest_digest == manifest_digest(prepared.manifest_bytes):
        return existing, prepared.manifest_bytes
    blob = await stub.GetManifest(
        catalog_pb2.GetManifestRequest(digest=existing.manifest_digest), timeout=UNARY_DEADLINE
    )
    if manifest_digest(blob.manifest) != existing.manifest_digest:
        raise IntegrityFailure(f"the coordinator's manifest of {existing.ref} does not match its digest")
    if not same_content(manifest_from_bytes(blob.manifest), prepared.manifest):
        return None
    return existing, bytes(blob.manifest)


async def publish(
    store: Store,
    path: Path | str,
    options: IngestOptions,
    coordinator: str,
    progress: ProgressFn | None = None,
) -> PublishResult:
    prepared = await asyncio.to_thread(prepare, store, path, options, progress)
    committed = False
    # One id for every attempt of this commit: a retry on another replica (rpc/replicas.py), or after
    # a reply that was lost, returns the version the first attempt made instead of making a second.
    commit_id = f"publish:{uuid.uuid4().hex}:{manifest_digest(prepared.manifest_bytes).hex()}"

    async def send(ch: grpc.aio.Channel, address: str) -> tuple[VersionInfo, bytes, int, int, bool]:
        same = None if options.allow_same else await unchanged_at(ch, options, prepared)
        if same is not None:
            return same[0], same[1], 0, 0, True
        blocks, size = await push_blocks(store, ch, sorted(prepared.manifest.block_ids()), options.layer)
        info = await _commit(ch, options, prepared, commit_id)
        return info, prepared.manifest_bytes, blocks, size, False

    try:
        info, manifest_bytes, blocks, size, unchanged = await replicas.call(coordinator, send)
        # Recorded here either way, so the next publish of the layer starts from it.
        pending = PendingCommit(manifest_bytes, prepared.prefilter, prepared.pins.ingest_id)
        await asyncio.to_thread(store.catalog.import_version, info, pending, options.tags)
        committed = True
    except grpc.RpcError as err:
        raise from_rpc_error(err, coordinator) from err
    finally:
        prepared.release(store, committed)
    result = prepared.result
    result.version = info
    result.unchanged = unchanged
    result.seconds = time.monotonic() - prepared.started
    return PublishResult(info, result, blocks, size, unchanged=result.unchanged)


async def _commit(
    ch: grpc.aio.Channel, options: IngestOptions, prepared: PreparedVersion, commit_id: str
) -> VersionInfo:
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
        commit_id=commit_id,
    )
    return version_from_pb(await catalog_pb2_grpc.CatalogStub(ch).Commit(request, timeout=UNARY_DEADLINE))
