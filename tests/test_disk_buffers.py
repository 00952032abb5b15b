"""Reply buffers used again (cachepoint/disk/buffers.py): a read into a buffer that held an earlier
reply must write every byte of the range itself, zeros included, on every read path."""

from __future__ import annotations

import os
import random
from pathlib import Path

from cachepoint.chunking import ChunkParams
from cachepoint.disk.attach import open_disk
from cachepoint.disk.buffers import ReplyBuffer, ReplyBuffers
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking, LayerKind
from cachepoint.store.store import Store

KiB = 1024
BS = 4 * KiB


def test_a_buffer_given_back_is_taken_again_as_it_is_and_nothing_else_is_kept():
    buffers = ReplyBuffers(kept_bytes=3 * BS)
    first, fresh = buffers.take(BS)
    assert fresh and isinstance(first, ReplyBuffer) and first == bytes(BS)
    first[:3] = b"old"
    buffers.give(memoryview(first)[1:])  # a reply's payload may be a view of its buffer
    buffers.give(first)  # given back twice: kept once
    again, fresh = buffers.take(BS)
    assert again is first and not fresh and again[:3] == b"old"
    assert buffers.take(BS)[1], "the buffer was handed out twice"
    buffers.give(bytearray(BS))  # not one of ours (a write's payload, a caller's buffer): ignored
    assert buffers.take(BS)[1]
    kept = [buffers.take(BS)[0] for _ in range(4)]
    for buffer in kept:
        buffers.give(buffer)
    assert sum(not buffers.take(BS)[1] for _ in range(4)) == 3, "kept over its bound"


def _ingest(store: Store, tmp_path: Path, layer: str, data: bytes, options: IngestOptions) -> str:
    path = tmp_path / f"{layer.replace('/', '_')}.img"
    path.write_bytes(data)
    result = ingest(store, path, options)
    assert result.version is not None
    return result.version.ref


def _stale_then_read(disk, offset: int, length: int) -> bytes:  # noqa: ANN001 - a CompositeDisk
    """Read ``length`` bytes at ``offset`` into a reply buffer that was just filled with 0xEE."""
    dirty = disk.read_sync(offset, length)  # the same span: its buffer is the one taken next
    buffer = dirty.obj if isinstance(dirty, memoryview) else dirty
    buffer[:] = b"\xee" * len(buffer)
    disk.release(dirty)
    got = disk.read_sync(offset, length)
    assert (got.obj if isinstance(got, memoryview) else got) is buffer, "the buffer was not used again"
    return bytes(got)


def test_holes_and_zero_markers_read_as_zeros_from_a_used_buffer(tmp_path: Path):
    data = bytearray(os.urandom(16 * BS))
    data[3 * BS : 6 * BS] = bytes(3 * BS)  # holes of the layer
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        options = IngestOptions("os/base", kind=LayerKind.OS, new_layer_block_size=BS)
        ref = _ingest(store, tmp_path, "os/base", bytes(data), options)
        disk = open_disk(store, [ref], user_layer="user/ann/desk")
        disk.write_zeroes_sync(8 * BS, 2 * BS)  # zero markers over data
        disk.write_sync(12 * BS + 10, b"user bytes")
        data[8 * BS : 10 * BS] = bytes(2 * BS)
        data[12 * BS + 10 : 12 * BS + 20] = b"user bytes"
        assert _stale_then_read(disk, 0, 16 * BS) == data
        assert _stale_then_read(disk, 2 * BS + 100, 9 * BS) == data[2 * BS + 100 : 11 * BS + 100]
        disk.close()


def test_gaps_between_pieces_read_as_zeros_from_a_used_buffer(tmp_path: Path):
    rng = random.Random(7)
    data = bytearray(rng.randbytes(64 * BS))
    for start in (5 * BS, 20 * BS, 41 * BS):  # runs of zero units: gaps between the pieces
        data[start : start + 6 * BS] = bytes(6 * BS)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        options = IngestOptions("os/base", chunking=Chunking.CONTENT, chunk_params=ChunkParams(BS, 16 * KiB))
        ref = _ingest(store, tmp_path, "os/base", bytes(data), options)
        disk = open_disk(store, [ref])
        assert _stale_then_read(disk, 0, len(data)) == data
        assert _stale_then_read(disk, BS + 7, 50 * BS) == data[BS + 7 : 51 * BS + 7]
        disk.close()


def test_a_short_last_block_of_a_lower_layer_is_followed_by_zeros_in_a_used_buffer(tmp_path: Path):
    base = os.urandom(2 * BS + 100)  # its last block is 100 bytes long
    upper = bytearray(6 * BS)
    upper[4 * BS :] = os.urandom(2 * BS)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        layers = (("os/base", base, LayerKind.OS), ("app/top", bytes(upper), LayerKind.APP))
        refs = [
            _ingest(store, tmp_path, layer, data, IngestOptions(layer, kind=kind, new_layer_block_size=BS))
            for layer, data, kind in layers
        ]
        disk = open_disk(store, refs)
        want = bytearray(upper)
        want[: len(base)] = base
        assert _stale_then_read(disk, 0, 6 * BS) == want
        disk.close()
