"""The decoded-block cache of attached disks, and the block status that lets clients skip zeros."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachepoint.blocks import CODEC_ZSTD, block_digest
from cachepoint.chunking import ChunkParams
from cachepoint.disk.attach import open_disk
from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.readcache import DecodedCache
from cachepoint.errors import BlockCorrupt
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking, LayerKind
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

BS = 4096


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store", writable=True, create=True) as opened:
        yield opened


def put_layer(store: Store, tmp_path: Path, layer: str, data: bytes) -> str:
    path = tmp_path / f"{layer.replace('/', '_')}.img"
    path.write_bytes(data)
    result = ingest(store, path, IngestOptions(layer, kind=LayerKind.OS, new_layer_block_size=BS))
    assert result.version is not None
    return result.version.ref


def test_blocks_come_back_as_put_and_the_clock_recycles_the_least_recently_used(tmp_path: Path):
    cache = DecodedCache(tmp_path / "cache", capacity=3 * BS, granule=BS)
    blocks = [os.urandom(BS) for _ in range(4)]
    for block in blocks[:3]:
        cache.put(block_digest(block), block)

    def read(block: bytes) -> bool:
        out = bytearray(BS)
        return not cache.copy_many([(block_digest(block), memoryview(out))]) and out == block

    assert read(blocks[0])
    # Full: the new block waits for the hand, which moves on the credit that hits and offers earn,
    # and takes only a block not used since it last passed: block 1, never read again.
    offers = 0
    while not read(blocks[3]):
        assert read(blocks[0]) and read(blocks[2])
        cache.put(block_digest(blocks[3]), blocks[3])
        offers += 1
        assert offers < 20, "the hand never reached an unused block"
    assert cache.refused == offers - 1 > 0
    assert [read(block) for block in blocks] == [True, False, True, True]
    cache.close()
    cache = DecodedCache(tmp_path / "cache", capacity=3 * BS, granule=BS)
    short = os.urandom(100)
    cache.put(block_digest(short), short)  # a disk's short last block
    out = bytearray(BS)
    assert cache.copy_many([(block_digest(short), memoryview(out))]) == [] and out[:100] == short
    cache.put(b"x" * 32, os.urandom(2 * BS))  # longer than a quarter of the cache: not kept
    assert cache.copy_many([(b"x" * 32, memoryview(bytearray(2 * BS)))]) == [0]
    cache.close()
    assert not (tmp_path / "cache").exists()


def hits_per_pass(cache: DecodedCache, passes: list[list[tuple[bytes, bytes]]], batch: int) -> list[int]:
    """Bytes the cache answered in each pass of a reader that reads ``batch`` blocks at a time and
    puts what missed (every hit checked against the block)."""
    hit_bytes = []
    for blocks in passes:
        hit = 0
        for start in range(0, len(blocks), batch):
            chunk = blocks[start : start + batch]
            targets = [(digest, memoryview(bytearray(len(data)))) for digest, data in chunk]
            missing = cache.copy_many(targets)
            for position, ((_, data), (_, target)) in enumerate(zip(chunk, targets, strict=True)):
                if position not in missing:
                    assert bytes(target) == data
                    hit += len(data)
            cache.put_many([chunk[position] for position in missing])
        hit_bytes.append(hit)
    return hit_bytes


def test_a_sequential_read_twice_the_cache_hits_half_of_it_from_the_second_pass_on(tmp_path: Path):
    cache = DecodedCache(tmp_path / "cache", capacity=8 * BS, granule=BS)
    blocks = blocks_of([BS] * 16, seed=10)
    hits = [n // BS for n in hits_per_pass(cache, [blocks] * 3, batch=4)]
    assert hits == [0, 8, 8], "plain CLOCK would be FIFO here: no hit at all"
    cache.close()


@pytest.mark.parametrize("times", [3, 5])
def test_a_sequential_read_of_a_disk_several_times_the_cache_keeps_hitting_its_share(
    tmp_path: Path, times: int
) -> None:
    """A hand moved one step by every miss went round more than once a pass here, and no pass hit."""
    cache = DecodedCache(tmp_path / "cache", capacity=100 * BS, granule=BS)
    blocks = blocks_of([BS] * 100 * times, seed=times)
    hits = [n // BS for n in hits_per_pass(cache, [blocks] * 5, batch=8)]
    assert hits == [0, 100, 100, 100, 100], hits
    cache.close()


def blocks_of(lengths: list[int], seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [(block_digest(b), b) for b in (rng.randbytes(n) for n in lengths)]


def test_blocks_of_any_length_share_the_cache_by_their_bytes_not_by_a_slot_each(tmp_path: Path):
    """32 KiB content chunks once took a 64 KiB slot each (half the cache) and a chunk over 64 KiB
    never stayed: now a block takes the pages it needs, whatever its length."""
    cache = DecodedCache(tmp_path / "cache", capacity=32 * BS, granule=BS)
    halves = blocks_of([2 * BS] * 16, seed=1)  # 16 blocks of two pages fill the 32 pages
    cache.put_many(halves)
    for digest, data in halves:
        out = bytearray(2 * BS)
        assert cache.copy_many([(digest, memoryview(out))]) == [] and out == data
    assert cache.refused == 0 and cache.hits == 16
    cache.close()
    cache = DecodedCache(tmp_path / "cache", capacity=32 * BS, granule=BS)
    mixed = blocks_of([8 * BS, BS + 100, 3 * BS, 5 * BS, 7 * BS], seed=2)  # 25 pages, one short tail
    cache.put_many(mixed)
    out = bytearray(8 * BS)
    wanted = [(digest, memoryview(out)[i * 0 : len(data)]) for i, (digest, data) in enumerate(mixed)]
    for (digest, data), (_, target) in zip(mixed, wanted, strict=True):
        assert cache.copy_many([(digest, target)]) == [] and bytes(target) == data
    cache.close()


def test_a_sequential_read_twice_the_cache_keeps_half_of_it_with_blocks_of_mixed_lengths(tmp_path: Path):
    rng = random.Random(3)
    blocks = blocks_of([rng.choice([BS, 2 * BS, 4 * BS, 7 * BS + 512]) for _ in range(200)], seed=4)
    total = sum(len(data) for _, data in blocks)
    cache = DecodedCache(tmp_path / "cache", capacity=total // 2, granule=BS)
    shares = [n / total for n in hits_per_pass(cache, [blocks] * 4, batch=8)]
    assert shares[0] == 0 and all(0.35 < share <= 0.5 for share in shares[1:]), shares
    assert cache.damaged == 0
    cache.close()


def test_a_new_working_set_replaces_an_old_one_within_a_few_passes(tmp_path: Path):
    """The hand's credit comes from hits too: a cache full of blocks nobody reads any more gives way
    to the ones being read, however slowly misses alone would move it."""
    cache = DecodedCache(tmp_path / "cache", capacity=100 * BS, granule=BS)
    old, new = blocks_of([BS] * 60, seed=8), blocks_of([BS] * 80, seed=9)
    hits = [n // BS for n in hits_per_pass(cache, [old] * 3 + [new] * 10, batch=8)]
    assert hits[:3] == [0, 60, 60] and hits[3] == 0
    assert hits[-3:] == [80, 80, 80], hits
    cache.close()


def test_blocks_never_overlap_in_the_file_whatever_the_order_of_puts_and_reads(tmp_path: Path):
    """A random walk of puts (lengths from a page to the largest kept) and reads: every hit is the
    block that was put, every kept block owns its pages alone."""
    rng = random.Random(5)
    cache = DecodedCache(tmp_path / "cache", capacity=40 * BS, granule=BS)
    pool = blocks_of([rng.randrange(1, 10 * BS) for _ in range(60)], seed=6)
    for _ in range(2000):
        digest, data = rng.choice(pool)
        if rng.random() < 0.5:
            cache.put(digest, data)
            continue
        out = bytearray(len(data))
        if not cache.copy_many([(digest, memoryview(out))]):
            assert out == data
    assert cache.damaged == 0 and cache.hits > 100 and cache.refused > 0
    owners: dict[int, int] = {}
    for start in cache._index.values():
        for granule in range(start, start + cache._span(cache._length[start])):
            assert granule not in owners and cache._owner[granule] == start
            owners[granule] = start
    assert all(owner == -1 for granule, owner in enumerate(cache._owner) if granule not in owners)
    cache.close()


def test_content_chunks_longer_than_64k_are_served_from_the_cache(store: Store, tmp_path: Path):
    data = random.Random(7).randbytes(4 * 1024 * 1024)
    path = tmp_path / "content.img"
    path.write_bytes(data)
    options = IngestOptions(
        "os/content", kind=LayerKind.OS, new_layer_chunking=Chunking.CONTENT, chunk_params=ChunkParams()
    )
    result = ingest(store, path, options)
    assert result.version is not None
    cache = DecodedCache(tmp_path / "cache", capacity=64 * 1024 * 1024)
    disk = open_disk(store, [result.version.ref], decoded=cache)
    assert bytes(disk.read_sync(0, len(data))) == data
    chunks = cache.misses
    lengths = [cache._length[start] for start in cache._index.values()]
    assert max(lengths) > 64 * 1024 and min(lengths) < 64 * 1024, "the image should give both"
    assert bytes(disk.read_sync(0, len(data))) == data
    assert cache.hits == chunks and len(lengths) == chunks, "every chunk, long or short, was kept"
    cache.close()


def test_a_damaged_cache_file_is_noticed_and_the_block_is_read_from_the_store(store: Store, tmp_path: Path):
    data = os.urandom(8 * BS)
    ref = put_layer(store, tmp_path, "os/base", data)
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    disk = open_disk(store, [ref], decoded=cache)
    assert bytes(disk.read_sync(0, len(data))) == data  # cold: verified, then kept
    assert cache.misses == 8 and cache.hits == 0
    assert bytes(disk.read_sync(0, len(data))) == data
    assert cache.hits == 8
    with open(tmp_path / "cache", "r+b") as raw:  # bit rot inside the cache file
        raw.seek(3 * BS + 17)
        raw.write(b"\xff\xfe")
    assert bytes(disk.read_sync(0, len(data))) == data
    assert cache.damaged == 1
    assert bytes(disk.read_sync(0, len(data))) == data and cache.damaged == 1  # refilled from the store
    cache.close()


def test_a_block_that_cannot_be_decoded_never_enters_the_cache(store: Store, tmp_path: Path):
    data = os.urandom(4 * BS)
    ref = put_layer(store, tmp_path, "os/base", data)
    digest = block_digest(data[BS : 2 * BS])
    batch = store.db.batch()
    undecodable = bytes((CODEC_ZSTD,)) + bytes(4) + os.urandom(BS)  # no zstd frame magic
    batch.put(digest, undecodable, store.db.handle[fmt.CF_BLOCKS])
    store.db.write(batch)
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    disk = open_disk(store, [ref], decoded=cache)
    for _ in range(2):  # and stays refused: nothing bad was cached
        with pytest.raises(BlockCorrupt):
            disk.read_sync(0, len(data))
    assert cache.copy_many([(digest, memoryview(bytearray(BS)))]) == [0]
    cache.close()


def test_a_warm_read_answers_on_the_event_loop_and_a_cold_one_goes_to_a_thread(store: Store, tmp_path: Path):
    data = os.urandom(16 * BS)
    ref = put_layer(store, tmp_path, "os/base", data)
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    disk = open_disk(store, [ref], decoded=cache)
    assert disk._read(0, 4 * BS, warm_only=True) is None  # nothing cached: the caller must wait
    assert bytes(asyncio.run(disk.read(0, 4 * BS))) == data[: 4 * BS]
    warm = disk._read(BS // 2, 3 * BS, warm_only=True)
    assert warm is not None and bytes(warm) == data[BS // 2 : BS // 2 + 3 * BS]
    cache.close()


def test_a_warm_read_of_a_partly_cached_range_reads_nothing_and_the_cold_read_reads_it_once(
    store: Store, tmp_path: Path
):
    """A range whose blocks are only partly cached is refused by the warm attempt before it copies
    any (it asks the index), so the thread's read is the only one that reads the cached blocks."""
    data = bytearray(os.urandom(8 * BS))
    data[5 * BS : 6 * BS] = bytes(BS)  # a hole: never cached, never asked for
    ref = put_layer(store, tmp_path, "os/base", bytes(data))
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    disk = open_disk(store, [ref], decoded=cache)
    assert bytes(disk.read_sync(0, 4 * BS)) == data[: 4 * BS]  # blocks 0-3 cached
    hits, misses = cache.hits, cache.misses
    assert disk.read_warm(0, 8 * BS) is None  # blocks 4, 6, 7 are not
    assert (cache.hits, cache.misses) == (hits, misses), "the warm attempt copied blocks"
    assert bytes(asyncio.run(disk.read_cold(0, 8 * BS))) == data
    assert (cache.hits - hits, cache.misses - misses) == (4, 3)
    assert cache.holds_all([block_digest(bytes(data[i * BS : (i + 1) * BS])) for i in (0, 4, 7)])
    assert not cache.holds_all([b"\x01" * 32])
    warm = disk.read_warm(BS, 7 * BS)  # everything cached now: answered in place
    assert warm is not None and bytes(warm) == data[BS:]
    cache.close()


def test_zero_runs_follow_holes_of_the_layers_and_the_users_writes(store: Store, tmp_path: Path):
    data = bytearray(os.urandom(12 * BS))
    data[2 * BS : 5 * BS] = bytes(3 * BS)  # blocks 2-4 are holes
    data[9 * BS :] = bytes(3 * BS)  # and 9-11
    ref = put_layer(store, tmp_path, "os/base", bytes(data))
    disk = open_disk(store, [ref], user_layer="user/ann/desk")
    size = len(data)
    assert disk.zero_runs(0, size, 100) == [(2 * BS, False), (3 * BS, True), (4 * BS, False), (3 * BS, True)]
    assert disk.zero_runs(100, 2 * BS, 1) == [(2 * BS - 100, False)]  # one run, from an unaligned start
    assert disk.zero_runs(3 * BS, BS, 100) == [(BS, True)]
    disk.write_sync(3 * BS, b"\x01" * 10)  # data over a hole
    disk.write_zeroes_sync(6 * BS, BS)  # zeros over data
    assert disk.zero_runs(0, size, 100) == [
        (2 * BS, False),
        (BS, True),
        (BS, False),
        (BS, True),
        (BS, False),
        (BS, True),
        (2 * BS, False),
        (3 * BS, True),
    ]
    assert disk.zero_runs(0, size, 2) == [(2 * BS, False), (BS, True)]
    disk.close()


def test_a_short_last_block_is_served_whole_from_the_cache(store: Store, tmp_path: Path):
    data = os.urandom(3 * BS + 1000)
    ref = put_layer(store, tmp_path, "os/base", data)
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    disk = CompositeDisk(store, open_disk(store, [ref]).stack, decoded=cache)
    for _ in range(2):
        assert bytes(disk.read_sync(0, len(data))) == data
        assert bytes(disk.read_sync(3 * BS + 500, 500)) == data[-500:]
    assert disk.zero_runs(0, len(data), 10) == [(len(data), False)]
    cache.close()


def test_a_cache_that_cannot_write_costs_only_the_cache(store: Store, tmp_path: Path):
    data = os.urandom(8 * BS)
    ref = put_layer(store, tmp_path, "os/base", data)
    cache = DecodedCache(tmp_path / "cache", capacity=64 * BS, granule=BS)
    os.close(cache._fd)  # as if the disk under the cache were full or gone: every write fails
    cache._fd = os.open(tmp_path / "cache", os.O_RDONLY)
    disk = open_disk(store, [ref], decoded=cache)
    for _ in range(2):
        assert bytes(disk.read_sync(0, len(data))) == data
    assert cache.failed_writes >= 1 and cache.hits == 0
    cache.close()
