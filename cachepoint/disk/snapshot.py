"""Snapshot: freeze a disk's working layer into a new version of the user's layer.

The new manifest is the user layer's previous version with the working entries laid over it; no
block is copied (the working blocks are already in the store). Entries that only repeat what the
layers under the user layer hold become holes, so the user layer stays the set of blocks that
really differ. The version and the clearing of the working map commit in one synced batch, and the
disk stays attached and writable throughout: writers wait on the disk's lock for the commit,
readers go on and see the same bytes before and after.
"""

from __future__ import annotations

import os
import time

from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.marker import is_zero_marker, reads_as_zeros
from cachepoint.errors import InvalidInput
from cachepoint.ids import DIGEST_SIZE, HOLE_DIGEST
from cachepoint.layers.ingest import default_author
from cachepoint.model import EntryType, FileEntry, LayerKind, Manifest, VersionInfo
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.wire import manifest_to_bytes


def snapshot(
    store: Store,
    disk: CompositeDisk,
    layer: str,
    message: str = "",
    *,
    author: str = "",
    device: str = "",
    tags: tuple[str, ...] = (),
) -> VersionInfo:
    """Commit ``disk``'s working changes as the next version of ``layer`` (its user layer)."""
    working = disk.working
    if working is None:
        raise InvalidInput("this disk is attached read-only: it has no changes to snapshot")
    if layer != working.layer:
        raise InvalidInput(
            f"the changes of disk {working.disk!r} belong to layer {working.layer!r}, not {layer!r}"
        )
    with disk.lock:
        base = disk.user_base
        count = disk.block_count
        below = disk.below_user()
        blocks = bytearray(disk.top_entry().blocks if base else b"")
        blocks += HOLE_DIGEST * (count - len(blocks) // DIGEST_SIZE)
        zero_blocks: dict[bytes, int] = {}
        for index, digest in working.entries.items():
            length = disk.block_length(index)
            under = below[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
            if digest == under or (reads_as_zeros(digest, length) and reads_as_zeros(under, length)):
                digest = HOLE_DIGEST  # what the lower layers hold: let it show through
            elif is_zero_marker(digest, length):
                zero_blocks[digest] = length
            blocks[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
        # Stored only until composite/export/fsck/gc know the marker (see marker.py).
        working.apply({}, [(marker, bytes(length)) for marker, length in zero_blocks.items()])
        top = disk.top_entry()
        entry = FileEntry(top.path, EntryType.FILE, top.mode, disk.size, time.time_ns(), blocks=bytes(blocks))
        manifest = Manifest(disk.block_size, True, (entry,))
        info = store.catalog.commit(
            layer=layer,
            kind=LayerKind.USER,
            pending=PendingCommit(manifest_to_bytes(manifest), {}),
            manifest=manifest,
            author=author or default_author(),
            device=device or os.uname().nodename,
            message=message,
            tags=tags,
            parent=base,
            also=lambda batch, made: working.stage_clear(batch, made.number),
        )
        disk.rebase(info, manifest)
    return info
