"""Space accounting: what the versions hold, what the store keeps, and the ratios between them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from cachepoint.blocks import raw_size
from cachepoint.ids import HOLE_DIGEST
from cachepoint.model import EntryType
from cachepoint.store import format as fmt
from cachepoint.store.store import Store


@dataclass(frozen=True, slots=True)
class StoreStats:
    layers: int
    versions: int
    logical_bytes: int  # sum over every version of its files' sizes: what plain copies would take
    referenced_bytes: int  # non-hole block bytes referenced by all versions, counted per reference
    unique_bytes: int  # raw bytes of the distinct blocks kept
    stored_bytes: int  # what blocks and manifests take at rest, after compression
    blocks: int
    disk_bytes: int  # RocksDB's files on disk (includes its own overhead and not-yet-compacted data)
    dedup_ratio: float  # referenced_bytes / unique_bytes
    compression_ratio: float  # unique_bytes / stored block bytes
    savings_ratio: float  # logical_bytes / stored_bytes

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _ratio(a: int, b: int) -> float:
    return round(a / b, 3) if b else 0.0


def store_stats(store: Store) -> StoreStats:
    versions = store.catalog.all_versions()
    logical = 0
    referenced = 0
    manifests: dict[bytes, int] = {}
    for info in versions:
        logical += info.logical_bytes
        if info.manifest_digest not in manifests:
            manifest = store.catalog.manifest(info.manifest_digest)
            size = 0
            for entry in manifest.entries:
                if entry.type != EntryType.FILE:
                    continue
                for index, digest in enumerate(entry.digests()):
                    if digest != HOLE_DIGEST:
                        start, end = entry.span(index, manifest.block_size)
                        size += end - start
            manifests[info.manifest_digest] = size
        referenced += manifests[info.manifest_digest]
    unique = stored_blocks = count = 0
    for _, value in store.blocks.scan():
        count += 1
        stored_blocks += len(value)
        unique += raw_size(value)
    stored_manifests = sum(len(v) for _, v in store.db.scan(fmt.CF_MANIFESTS))
    stored = stored_blocks + stored_manifests
    disk = 0
    for dirpath, _, files in os.walk(store.db.path):
        disk += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return StoreStats(
        layers=len(store.catalog.layers()),
        versions=len(versions),
        logical_bytes=logical,
        referenced_bytes=referenced,
        unique_bytes=unique,
        stored_bytes=stored,
        blocks=count,
        disk_bytes=disk,
        dedup_ratio=_ratio(referenced, unique),
        compression_ratio=_ratio(unique, stored_blocks),
        savings_ratio=_ratio(logical, stored),
    )
