"""Composite disks in the process: reads through the layers, copy-on-write, snapshots."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachepoint.blocks import CODEC_ZSTD
from cachepoint.disk.attach import open_disk
from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.marker import zero_marker
from cachepoint.disk.snapshot import snapshot
from cachepoint.disk.working import working_disks
from cachepoint.errors import BlockCorrupt, InvalidInput
from cachepoint.ids import HOLE_DIGEST
from cachepoint.layers.composite import composite
from cachepoint.layers.export import export_single
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import LayerKind
from cachepoint.store import format as fmt
from cachepoint.store.fsck import fsck
from cachepoint.store.gc import collect
from cachepoint.store.store import Store

BS = 4096
BLOCKS = 16


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store", writable=True, create=True) as opened:
        yield opened


def put_layer(store: Store, tmp_path: Path, layer: str, data: bytes, kind: LayerKind = LayerKind.OS) -> str:
    path = tmp_path / f"{layer.replace('/', '_')}.img"
    path.write_bytes(data)
    result = ingest(store, path, IngestOptions(layer, kind=kind, new_layer_block_size=BS))
    assert result.version is not None
    return result.version.ref


def pattern(seed: int, size: int = BLOCKS * BS) -> bytes:
    """Blocks of random data with every fourth block a hole."""
    rng = os.urandom(size)
    return b"".join(
        bytes(BS) if (i + seed) % 4 == 0 else rng[i * BS : (i + 1) * BS] for i in range(size // BS)
    )


@pytest.fixture
def two_layers(store: Store, tmp_path: Path) -> tuple[bytes, bytes, list[str]]:
    """An OS layer and an app layer whose data covers part of it."""
    os_data = pattern(1)
    app_data = bytearray(len(os_data))
    for i in range(0, BLOCKS, 3):
        app_data[i * BS : (i + 1) * BS] = os.urandom(BS)
    refs = [
        put_layer(store, tmp_path, "os/base", os_data),
        put_layer(store, tmp_path, "app/tool", bytes(app_data)),
    ]
    expected = bytearray(os_data)
    for i in range(0, BLOCKS, 3):
        expected[i * BS : (i + 1) * BS] = app_data[i * BS : (i + 1) * BS]
    return os_data, bytes(expected), refs


def test_a_read_only_disk_reads_each_block_from_the_topmost_layer_that_has_data(store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs)
    assert disk.read_only and disk.size == len(expected) and disk.block_size == BS
    assert disk.read_sync(0, disk.size) == expected
    for offset, length in ((0, 1), (BS - 7, 20), (3 * BS + 100, 5 * BS), (disk.size - 3, 3), (5, 0)):
        assert disk.read_sync(offset, length) == expected[offset : offset + length]
    with pytest.raises(ValueError):
        disk.read_sync(disk.size - 10, 11)
    with pytest.raises(PermissionError):
        disk.write_sync(0, b"x")


def test_writes_land_in_the_working_layer_and_never_in_the_layers_below(store, two_layers):
    _, expected, refs = two_layers
    before = {info.layer: info for info in store.catalog.all_versions()}
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    assert not disk.read_only
    model = bytearray(expected)
    # Every written byte differs from the byte below it: a write equal to the layers below would
    # (rightly) leave no working entry, and the layers hold random data.
    edge = BS * 9 - 1
    straddle = bytes(b ^ 0xFF for b in expected[edge : edge + 2])
    for offset, data in ((1000, b"\x11" * 3000), (BS * 5, b"\x22" * BS * 2), (edge, straddle)):
        disk.write_sync(offset, data)
        model[offset : offset + len(data)] = data
    assert disk.read_sync(0, disk.size) == bytes(model)
    assert sorted(disk.working.entries) == [0, 5, 6, 8, 9]
    assert {info.layer: info for info in store.catalog.all_versions()} == before
    assert open_disk(store, refs).read_sync(0, disk.size) == expected  # other disks see no change


def test_a_write_that_restores_the_lower_data_drops_its_working_entry(store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    disk.write_sync(2 * BS + 10, b"\x99" * 100)
    assert list(disk.working.entries) == [2]
    disk.write_sync(2 * BS + 10, expected[2 * BS + 10 : 2 * BS + 110])
    assert disk.working.entries == {}
    disk.write_sync(0, expected)  # rewriting everything unchanged adds nothing
    assert disk.working.entries == {}


def test_zeroes_over_data_are_a_zero_marker_and_zeroes_over_holes_are_nothing(store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    hole = next(i for i in range(BLOCKS) if expected[i * BS : (i + 1) * BS] == bytes(BS))
    data = next(i for i in range(BLOCKS) if expected[i * BS : (i + 1) * BS] != bytes(BS))
    asyncio.run(disk.write_zeroes(hole * BS, BS))
    assert disk.working.entries == {}
    asyncio.run(disk.trim(data * BS, BS))
    assert disk.working.entries == {data: zero_marker(BS)}
    assert disk.read_sync(data * BS, BS) == bytes(BS)
    assert not store.blocks.has(zero_marker(BS))  # read as zeros, never stored by a write
    disk.write_sync(data * BS, expected[data * BS : (data + 1) * BS])
    assert disk.working.entries == {}
    disk.write_zeroes_sync(data * BS + 10, 20)  # part of a block: read-modify-write
    model = bytearray(expected)
    model[data * BS + 10 : data * BS + 30] = bytes(20)
    assert disk.read_sync(0, disk.size) == bytes(model)


def test_the_working_map_survives_closing_and_reopening_the_store(tmp_path, store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk", name="alice")
    disk.write_sync(BS + 1, b"persist me")
    asyncio.run(disk.flush())
    disk.close()
    store.close()
    with Store.open(tmp_path / "store", writable=True) as again:
        assert working_disks(again) == ["alice"]
        reopened = open_disk(again, refs, user_layer="user/alice/disk", name="alice")
        assert reopened.read_sync(BS + 1, 10) == b"persist me"
        assert reopened.read_sync(0, BS) == expected[:BS]
        reopened.close()


def test_a_snapshot_makes_a_user_version_of_only_the_changed_blocks_and_the_disk_stays_writable(
    store, two_layers, tmp_path
):
    _, expected, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    data_block = next(i for i in range(BLOCKS) if expected[i * BS : (i + 1) * BS] != bytes(BS))
    model = bytearray(expected)
    for offset, data in ((BS * 2 + 5, b"\x44" * 50), (BS * 7, b"\x55" * BS)):
        disk.write_sync(offset, data)
        model[offset : offset + len(data)] = data
    disk.write_zeroes_sync(data_block * BS, BS)
    model[data_block * BS : (data_block + 1) * BS] = bytes(BS)
    changed = set(disk.working.entries)
    os_before = store.catalog.version("os/base", 1)

    info = snapshot(store, disk, "user/alice/disk", "first")
    assert info.ref == "user/alice/disk@1" and info.kind == LayerKind.USER and info.parent == 0
    assert disk.working.entries == {} and disk.user_base == 1
    assert disk.read_sync(0, disk.size) == bytes(model)
    manifest = store.catalog.manifest(info.manifest_digest)
    stored = {i for i, d in enumerate(manifest.entries[0].digests()) if d != HOLE_DIGEST}
    assert stored == changed
    assert manifest.entries[0].digest_at(data_block) == zero_marker(BS)
    assert store.catalog.version("os/base", 1) == os_before and store.catalog.layer("os/base").latest == 1

    # Still attached and writable: a second snapshot builds on the first.
    disk.write_sync(BS * 7, expected[BS * 7 : BS * 8])  # back to the lower data: a hole again
    disk.write_sync(BS * 11 + 3, b"\x66" * 4)
    model[BS * 7 : BS * 8] = expected[BS * 7 : BS * 8]
    model[BS * 11 + 3 : BS * 11 + 7] = b"\x66" * 4
    second = snapshot(store, disk, "user/alice/disk", "second")
    assert second.number == 2 and second.parent == 1
    fresh = open_disk(store, [*refs, "user/alice/disk@2"])
    assert fresh.read_sync(0, fresh.size) == bytes(model)
    held = {
        i
        for i, d in enumerate(store.catalog.manifest(second.manifest_digest).entries[0].digests())
        if d != HOLE_DIGEST
    }
    assert held == (changed - {7}) | {11}

    # The code that does not know the zero marker yet exports and checks the same bytes.
    stack = [
        (i, store.catalog.manifest(i.manifest_digest)) for i in (*map(store.catalog.resolve, refs), second)
    ]
    export_single(store, composite(stack).entries[0], tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == bytes(model)
    assert fsck(store).ok


def test_a_working_map_made_over_one_user_version_is_refused_over_another(store, two_layers, tmp_path):
    expected_size = len(two_layers[1])
    _, _, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    disk.write_sync(0, b"one")
    snapshot(store, disk, "user/alice/disk")
    disk.write_sync(0, b"two")  # not snapshotted: made over user/alice/disk@1
    disk.close()
    # Another device's version arrives: the layer's latest is now @2.
    put_layer(store, tmp_path, "user/alice/disk", os.urandom(expected_size), kind=LayerKind.USER)
    with pytest.raises(InvalidInput, match="snapshot or discard"):
        open_disk(store, refs, user_layer="user/alice/disk")
    again = open_disk(store, [*refs, "user/alice/disk@1"], user_layer="user/alice/disk")
    assert again.read_sync(0, 3) == b"two"
    again.working.discard()
    again.close()
    assert working_disks(store) == []
    open_disk(store, refs, user_layer="user/alice/disk").close()  # nothing left to conflict


def test_a_disk_whose_size_is_not_a_multiple_of_the_block_size_handles_its_short_last_block(store, tmp_path):
    data = os.urandom(3 * BS + 1000)
    ref = put_layer(store, tmp_path, "os/odd", data)
    disk = open_disk(store, [ref], user_layer="user/bob/odd")
    assert disk.size == len(data)
    disk.write_zeroes_sync(3 * BS, 1000)
    assert disk.working.entries == {3: zero_marker(1000)}
    disk.write_sync(3 * BS + 990, b"\x01" * 10)
    assert disk.read_sync(3 * BS, 1000) == bytes(990) + b"\x01" * 10
    info = snapshot(store, disk, "user/bob/odd")
    out = tmp_path / "odd.img"
    stack = [(i, store.catalog.manifest(i.manifest_digest)) for i in (store.catalog.resolve(ref), info)]
    export_single(store, composite(stack).entries[0], out)
    assert out.read_bytes() == data[: 3 * BS] + bytes(990) + b"\x01" * 10


def test_concurrent_partial_writes_into_one_block_lose_nothing(store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    pieces = 32
    width = BS // pieces

    def write(k: int) -> None:
        disk.write_sync(BS * 4 + k * width, bytes([k + 1]) * width)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(pieces)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert disk.read_sync(BS * 4, BS) == b"".join(bytes([k + 1]) * width for k in range(pieces))


def test_gc_keeps_the_blocks_of_an_attached_disks_working_layer(store, two_layers):
    _, _, refs = two_layers
    disk = open_disk(store, refs, user_layer="user/alice/disk")
    unique = os.urandom(BS)
    disk.write_sync(BS * 3, unique)
    collect(store)
    assert disk.read_sync(BS * 3, BS) == unique
    assert disk.working.entries[3] in store.working_block_ids()


def test_a_corrupt_lower_block_fails_the_read_instead_of_returning_wrong_bytes(store, two_layers):
    _, expected, refs = two_layers
    disk = open_disk(store, refs)
    digest = disk._view.digest(1)
    assert digest != HOLE_DIGEST
    batch = store.db.batch()
    # A value that cannot be decoded: what a read must refuse without hashing (a value that decodes to
    # other bytes is the scrub's to find: tests/test_blocksource.py).
    batch.put(digest, bytes((CODEC_ZSTD,)) + bytes(4) + os.urandom(BS), store.db.handle[fmt.CF_BLOCKS])
    store.db.write(batch)
    with pytest.raises(BlockCorrupt):
        CompositeDisk(store, disk.stack).read_sync(BS, 10)
