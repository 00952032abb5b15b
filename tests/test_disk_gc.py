"""GC keeps the blocks of a disk's unsnapshotted writes, whether or not the disk is attached."""

from __future__ import annotations

import os

from cachepoint.disk.attach import open_disk
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import LayerKind
from cachepoint.store.fsck import fsck
from cachepoint.store.gc import collect
from cachepoint.store.store import Store

BS = 65536


def test_gc_keeps_the_writes_of_a_detached_disk_and_fsck_does_not_call_them_garbage(tmp_path):
    base = tmp_path / "os.img"
    base.write_bytes(os.urandom(8 * BS))
    written = os.urandom(BS)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        ingest(store, base, IngestOptions(layer="os/base", kind=LayerKind.OS))
        disk = open_disk(store, ["os/base"], user_layer="user/alice/disk", name="alice")
        disk.write_sync(2 * BS, written)
        disk.flush_sync()
        disk.close()  # detached: only the working map names the block now
        result = collect(store)
        assert result.blocks_removed == 0
        report = fsck(store)
        assert report.ok and report.unreferenced_blocks == 0
        disk = open_disk(store, ["os/base"], user_layer="user/alice/disk", name="alice")
        try:
            assert disk.read_sync(2 * BS, BS) == written
            assert disk.read_sync(0, BS) == base.read_bytes()[:BS]
        finally:
            disk.close()
