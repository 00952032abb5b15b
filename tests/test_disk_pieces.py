"""Content-chunked layers in stacks: under fixed layers, over them, and under the user's writes.

A content-chunked layer has no grid, so an upper fixed block covers part of a chunk and the rest of
the chunk still shows (cachepoint/layers/pieces.py). Every reader (NBD through CompositeDisk, HTTP,
export) must give the bytes a byte-by-byte composition of the layers gives: the reference here is
built from the layers' source files alone, at each layer's own granularity (its holes: 64 KiB blocks
of zeros for fixed layers, 4 KiB units of zeros for content chunks).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest

from cachepoint.chunking import ChunkParams
from cachepoint.disk.attach import open_disk
from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.snapshot import snapshot
from cachepoint.http.app import start_http
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.layers.pieces import overlay
from cachepoint.model import Chunking
from cachepoint.store.store import Store
from tests.conftest import run_cli
from tests.test_content_chunks import disk_bytes

KiB = 1024
UNIT = 4 * KiB
BS = 64 * KiB
SIZE = 3 * 1024 * KiB + 5 * UNIT + 100  # not a multiple of the grid, nor of the unit


def content(layer: str) -> IngestOptions:
    return IngestOptions(layer, chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, 16 * KiB))


def fixed(layer: str) -> IngestOptions:
    return IngestOptions(layer, chunking=Chunking.FIXED)


def sparse_layer(seed: int, size: int = SIZE) -> bytes:
    """An upper layer's image: data in some places (runs that start and end off the grid and off the
    unit), zeros elsewhere."""
    rng = random.Random(seed)
    out = bytearray(size)
    for _ in range(12):
        start = rng.randrange(size)
        length = min(rng.randint(1, 200 * KiB), size - start)
        out[start : start + length] = rng.randbytes(length)
    return bytes(out)


def composed(layers: list[tuple[bytes, int]]) -> bytes:
    """The reference: each layer's non-zero pieces of its granularity over what is below."""
    size = max(len(data) for data, _ in layers)
    out = bytearray(size)
    for data, granularity in layers:
        for start in range(0, len(data), granularity):
            piece = data[start : start + granularity]
            if piece.count(0) != len(piece):
                out[start : start + len(piece)] = piece
    return bytes(out)


def test_overlay_gives_what_a_byte_by_byte_composition_gives() -> None:
    rng = random.Random(2)
    for _ in range(2000):
        size = rng.randint(1, 80)
        layers = []
        for layer in range(rng.randint(1, 4)):
            runs, pos = [], 0
            while pos < size:
                length = rng.randint(1, 9)
                if rng.random() < 0.6:
                    runs.append((pos, min(size, pos + length), bytes([layer, pos]), 0))
                pos += length
            layers.append(runs)
        expected: list[tuple[bytes, int] | None] = [None] * size
        for runs in layers:
            for start, end, digest, skip in runs:
                for at in range(start, end):
                    expected[at] = (digest, skip + at - start)
        pieces = layers[0]
        for runs in layers[1:]:
            pieces = overlay(pieces, runs)
        got: list[tuple[bytes, int] | None] = [None] * size
        for position, (start, end, digest, skip) in enumerate(pieces):
            assert start < end and (position + 1 == len(pieces) or end <= pieces[position + 1][0])
            for at in range(start, end):
                got[at] = (digest, skip + at - start)
        assert got == expected, (layers, pieces)


@pytest.mark.parametrize("order", ["fixed over content", "content over fixed", "content, fixed, content"])
def test_a_stack_with_content_chunks_reads_exports_and_serves_http_as_its_layers_composed(
    tmp_path: Path, order: str
) -> None:
    base, middle, top = disk_bytes(5, SIZE), sparse_layer(6), sparse_layer(7)
    if order == "fixed over content":
        layers = [("os/base", base, content, UNIT), ("apps/x", middle, fixed, BS)]
    elif order == "content over fixed":
        layers = [("os/base", base, fixed, BS), ("apps/x", middle, content, UNIT)]
    else:
        layers = [
            ("os/base", base, content, UNIT),
            ("apps/x", middle, fixed, BS),
            ("apps/y", top, content, UNIT),
        ]
    expected = composed([(data, granularity) for _, data, _, granularity in layers])
    store_dir = tmp_path / "store"
    with Store.open(store_dir, writable=True, create=True) as store:
        for layer, data, options, _ in layers:
            (tmp_path / "layer.img").write_bytes(data)
            ingest(store, tmp_path / "layer.img", options(layer))
        refs = [layer for layer, _, _, _ in layers]
        store.catalog.create_image("img", refs)
        disk = open_disk(store, refs)
        assert disk.size == SIZE and disk.read_only
        rng = random.Random(8)
        for _ in range(200):
            offset = rng.randrange(SIZE)
            length = min(rng.randint(1, 300 * KiB), SIZE - offset)
            assert bytes(disk.read_sync(offset, length)) == expected[offset : offset + length], offset
        position = 0
        for length, zeros in disk.zero_runs(0, SIZE, 100_000):
            if zeros:
                assert expected[position : position + length] == bytes(length), position
            position += length
        assert position == SIZE

        async def over_http() -> None:
            runner, address = await start_http(store, "127.0.0.1:0")
            url = f"http://{address}/v1/images/img/disk"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
                    async with client.get(url) as whole:
                        assert await whole.read() == expected
                    for _ in range(20):
                        start = rng.randrange(SIZE)
                        stop = min(SIZE, start + rng.randint(1, 2 * 1024 * KiB))
                        async with client.get(url, headers={"Range": f"bytes={start}-{stop - 1}"}) as reply:
                            assert reply.status == 206
                            assert await reply.read() == expected[start:stop], (start, stop)
            finally:
                await runner.cleanup()

        asyncio.run(over_http())
    run_cli(store_dir, "image", "export", "img", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == expected


def test_writes_over_a_content_chunked_layer_keep_only_what_differs_and_survive_snapshots(
    tmp_path: Path,
) -> None:
    base = disk_bytes(9, SIZE)
    (tmp_path / "base.img").write_bytes(base)
    store_dir = tmp_path / "store"
    model = bytearray(base)
    rng = random.Random(10)
    with Store.open(store_dir, writable=True, create=True) as store:
        ingest(store, tmp_path / "base.img", content("os/base"))
        for round_ in range(3):
            disk = open_disk(store, ["os/base"], user_layer="user/a/disk")
            assert not disk.read_only and disk.block_size == BS
            assert bytes(disk.read_sync(0, SIZE)) == model, round_
            for _ in range(40):
                offset = rng.randrange(SIZE)
                length = min(rng.randint(1, 150 * KiB), SIZE - offset)
                kind = rng.random()
                if kind < 0.2:  # zeros, over data or over zeros
                    disk.write_zeroes_sync(offset, length)
                    model[offset : offset + length] = bytes(length)
                elif kind < 0.4:  # what is already there: no block changes
                    disk.write_sync(offset, bytes(model[offset : offset + length]))
                else:
                    data = rng.randbytes(length)
                    disk.write_sync(offset, data)
                    model[offset : offset + length] = data
            assert bytes(disk.read_sync(0, SIZE)) == model
            # Only blocks that differ from the layers below are the user's: a block rewritten with
            # what is below, or zeroed where zeros are below, leaves no entry.
            lower = bytes(CompositeDisk(store, disk.stack).read_sync(0, SIZE))
            assert disk.working.entries
            for index in disk.working.entries:
                block = slice(index * BS, min(SIZE, (index + 1) * BS))
                assert model[block] != lower[block], index
            info = snapshot(store, disk, "user/a/disk", f"round {round_}")
            assert info.number == round_ + 1
            assert bytes(disk.read_sync(0, SIZE)) == model  # still attached, same bytes
            disk.close()
        stack = [store.catalog.resolve(ref) for ref in ("os/base", "user/a/disk")]
        reopened = CompositeDisk(store, [(v, store.catalog.manifest(v.manifest_digest)) for v in stack])
        assert bytes(reopened.read_sync(0, SIZE)) == model
        store.catalog.create_image("mine", ["os/base", "user/a/disk"])
    run_cli(store_dir, "image", "export", "mine", tmp_path / "mine.img")
    assert (tmp_path / "mine.img").read_bytes() == model
    assert run_cli(store_dir, "fsck", "--json").json()["ok"]
