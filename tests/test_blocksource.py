"""Block sources composed: a cache over a write-back over the fleet, missing versus corrupt, and what a
local read checks now that blocks are verified once (at ingest and on arrival from another machine)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from cachepoint.blocks import CODEC_RAW, CODEC_ZSTD, block_digest
from cachepoint.blocksource import (
    CachedSource,
    MemoryCache,
    StoreSource,
    TieredSource,
    VerifiedSource,
    WriteBack,
)
from cachepoint.disk.attach import open_disk
from cachepoint.errors import BlockCorrupt, BlockMissing, BlockUnreadable
from cachepoint.http.ranges import ByteRange
from cachepoint.http.reader import read_span
from cachepoint.layers.export import PlacedFile
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import LayerKind
from cachepoint.store import format as fmt
from cachepoint.store.scrub import CORRUPT, check_batch
from cachepoint.store.store import Store
from tests.damage import flip_in_sst

BS = 64 * 1024
BLOCKS = 8


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on a thread of its own, as the daemon's is to its reader threads."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(timeout=10)
    running.close()


def put_image(root: Path, data: bytes) -> tuple[str, list[bytes]]:
    """Ingest ``data`` as os/base into a new store at ``root``; its ref and its block ids in order."""
    image = root.with_suffix(".img")
    image.write_bytes(data)
    with Store.open(root, writable=True, create=True) as store:
        result = ingest(store, image, IngestOptions("os/base", kind=LayerKind.OS))
        assert result.version is not None
        entry = store.catalog.manifest(result.version.manifest_digest).entries[0]
        return result.version.ref, list(entry.digests())


class Fleet:
    """The fleet as TieredSource sees it: a coroutine that returns stored values of another store,
    counting what it was asked."""

    def __init__(self, store: Store) -> None:
        self.origin = StoreSource(store)
        self.asked: list[bytes] = []

    async def fetch(self, ids: list[bytes]) -> dict[bytes, bytes]:
        self.asked.extend(ids)
        return self.origin.stored_many(ids)


def test_a_cache_over_a_write_back_over_the_fleet_fetches_each_block_once_and_keeps_it(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    data = os.urandom(BLOCKS * BS)
    _, ids = put_image(tmp_path / "origin", data)
    with (
        Store.open(tmp_path / "origin") as origin_store,
        Store.open(tmp_path / "local", writable=True, create=True) as local_store,
    ):
        fleet = Fleet(origin_store)
        back = WriteBack(StoreSource(local_store), TieredSource(fleet.fetch, loop, timeout=30))
        chain = CachedSource(back, MemoryCache(4 * BLOCKS * BS))
        assert chain.far, "a disk over this chain must name its readahead"

        # A cold read of block 0 names blocks 1-3 as its readahead: one trip fetches all four.
        out = bytearray(BS)
        assert chain.read_into([(ids[0], memoryview(out))], also=ids[1:4]) == []
        assert out == data[:BS]
        assert sorted(fleet.asked) == sorted(ids[:4]) and back.fetched == 4
        assert local_store.blocks.missing(ids[:4]) == [], "the write-back keeps what it fetched"

        found = chain.get_many(ids)
        assert b"".join(found[d] for d in ids) == data
        assert sorted(fleet.asked) == sorted(ids), "each block was fetched once"

        # Warm: from the cache, without a thread, and the fleet is not asked again.
        again = [(d, memoryview(bytearray(BS))) for d in ids]
        assert chain.read_into(again, nowait=True) == []
        assert b"".join(bytes(t) for _, t in again) == data
        # And the store alone now answers, with no cache in front of it.
        assert b"".join(StoreSource(local_store).get_many(ids)[d] for d in ids) == data
        assert len(fleet.asked) == BLOCKS


def test_an_id_no_source_has_is_missing_and_the_reader_names_it(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    data = os.urandom(2 * BS)
    _, ids = put_image(tmp_path / "origin", data)
    unknown = block_digest(b"no such block")
    with (
        Store.open(tmp_path / "origin") as origin_store,
        Store.open(tmp_path / "local", writable=True, create=True) as local_store,
    ):
        fleet = Fleet(origin_store)
        chain = CachedSource(
            WriteBack(StoreSource(local_store), TieredSource(fleet.fetch, loop, timeout=30)), MemoryCache(BS)
        )
        found = chain.get_many([ids[0], unknown])
        assert set(found) == {ids[0]}, "missing is absent, not an error"
        assert unknown in fleet.asked, "a block the store lacks is asked of the fleet"
        targets = [(unknown, memoryview(bytearray(BS)))]
        assert chain.read_into(targets) == [0]
        # A reader whose blocks must all be there names the missing one.
        entry = origin_store.catalog.manifest(origin_store.catalog.resolve("os/base@1").manifest_digest)
        placed = PlacedFile(entry.entries[0], BS)
        with pytest.raises(BlockMissing, match=ids[1].hex()):
            read_span(StoreSource(local_store), placed, ByteRange(0, 2 * BS))


def test_a_corrupt_local_block_is_an_error_and_never_fetched_again_as_if_missing(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    data = os.urandom(2 * BS)
    ref, ids = put_image(tmp_path / "local", data)
    put_image(tmp_path / "origin", data)
    with (
        Store.open(tmp_path / "origin") as origin_store,
        Store.open(tmp_path / "local", writable=True) as local_store,
    ):
        batch = local_store.db.batch()
        undecodable = bytes((CODEC_ZSTD,)) + bytes(4) + os.urandom(BS)  # no zstd frame magic
        batch.put(ids[1], undecodable, local_store.db.handle[fmt.CF_BLOCKS])
        local_store.db.write(batch)
        fleet = Fleet(origin_store)
        chain = CachedSource(
            WriteBack(StoreSource(local_store), TieredSource(fleet.fetch, loop, timeout=30)),
            MemoryCache(4 * BS),
        )
        with pytest.raises(BlockCorrupt, match=ids[1].hex()):
            chain.get_many(ids)
        with pytest.raises(BlockCorrupt, match=ids[1].hex()):
            chain.read_into([(d, memoryview(bytearray(BS))) for d in ids])
        assert fleet.asked == [], "a corrupt block is not missing: the fleet was not asked"
        with pytest.raises(BlockCorrupt):
            open_disk(local_store, [ref]).read_sync(0, 2 * BS)


def test_a_record_rocksdb_refuses_is_unreadable_through_every_source(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    data = os.urandom(BLOCKS * BS)  # random: stored raw, so its bytes sit in the SST as they are
    ref, ids = put_image(tmp_path / "local", data)
    put_image(tmp_path / "origin", data)
    victim = flip_in_sst(tmp_path / "local")
    with Store.open(tmp_path / "origin") as origin_store, Store.open(tmp_path / "local") as local_store:
        fleet = Fleet(origin_store)
        chain = CachedSource(
            WriteBack(StoreSource(local_store), TieredSource(fleet.fetch, loop, timeout=30)),
            MemoryCache(BLOCKS * BS),
        )
        with pytest.raises(BlockUnreadable, match=victim.hex()):
            StoreSource(local_store).get_many([victim])
        with pytest.raises(BlockUnreadable, match=victim.hex()):
            chain.get_many(ids)
        assert fleet.asked == []
        at = ids.index(victim) * BS
        with pytest.raises(BlockUnreadable):
            open_disk(local_store, [ref]).read_sync(at, BS)


def test_a_block_that_decodes_to_other_bytes_is_read_as_stored_and_the_scrub_finds_it(tmp_path: Path) -> None:
    """Verified once: a local read decodes without hashing. Bytes that decode cleanly to something
    else under a sound RocksDB record (a writer's bug, not rot: rot below RocksDB fails its checksums)
    are the scrub's to find, and a reader that states digests (evidence) checks them itself."""
    data = os.urandom(2 * BS)
    _, ids = put_image(tmp_path / "local", data)
    other = os.urandom(BS)
    with Store.open(tmp_path / "local", writable=True) as store:
        batch = store.db.batch()
        batch.put(ids[0], bytes((CODEC_RAW,)) + other, store.db.handle[fmt.CF_BLOCKS])
        store.db.write(batch)
        assert StoreSource(store).get_many([ids[0]]) == {ids[0]: other}
        with pytest.raises(BlockCorrupt, match=ids[0].hex()):
            VerifiedSource(StoreSource(store)).get_many(ids)
        check = check_batch(store, None, 100)
        assert [(bad.digest, bad.kind) for bad in check.bad] == [(ids[0], CORRUPT)]


def test_a_batch_of_zstd_blocks_decodes_in_one_call_and_a_bad_frame_in_it_is_named(tmp_path: Path) -> None:
    """StoreSource.get_views decodes a batch's zstd frames in one call (cachepoint/blocks.py
    decode_batch): the same bytes as one by one; a frame without a declared size (another writer's)
    still decodes; an undecodable one is BlockCorrupt naming its block, never a wrong block."""
    data = b"".join(bytes([i]) * (BS // 2) + os.urandom(BS // 2) for i in range(1, BLOCKS + 1))
    _, ids = put_image(tmp_path / "store", data)
    with Store.open(tmp_path / "store", writable=True) as store:
        source = StoreSource(store)
        assert all(value[0] == CODEC_ZSTD for value in source.stored_many(ids).values())
        views = source.get_views(ids)
        assert {digest: bytes(view) for digest, view in views.items()} == source.get_many(ids)
        assert b"".join(bytes(views[digest]) for digest in ids) == data

        handle = store.db.handle[fmt.CF_BLOCKS]
        sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(data[2 * BS : 3 * BS])
        batch = store.db.batch()
        batch.put(ids[2], bytes((CODEC_ZSTD,)) + sizeless, handle)
        store.db.write(batch)
        assert bytes(source.get_views(ids)[ids[2]]) == data[2 * BS : 3 * BS]

        batch = store.db.batch()
        batch.put(ids[5], bytes((CODEC_ZSTD,)) + bytes(4) + os.urandom(BS), handle)  # no frame magic
        store.db.write(batch)
        with pytest.raises(BlockCorrupt, match=ids[5].hex()):
            source.get_views(ids)
