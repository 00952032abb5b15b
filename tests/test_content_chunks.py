"""Content-aligned chunks for disk images: the chunker, the versioned manifest with its extent index,
every reader (export, HTTP Range, NBD) through it, the re-ingest pre-filter, stores written before it
existed, and replication between real daemons."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cachepoint.chunking import ChunkParams, cut, merge_holes
from cachepoint.disk.attach import open_disk
from cachepoint.errors import InvalidInput
from cachepoint.http.app import start_http
from cachepoint.ids import HOLE_DIGEST
from cachepoint.layers import chunked
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking, FileEntry, Manifest, pack_extents
from cachepoint.store.store import Store
from cachepoint.v1 import manifest_pb2
from cachepoint.wire import manifest_from_bytes, manifest_to_bytes
from tests.conftest import REPO, cli_env, daemon, run_cli, sha256_file
from tests.fleet import Fleet, cli_json, export_digest

KiB = 1024
UNIT = 4 * KiB
CONTENT = IngestOptions("os/disk", chunking=Chunking.CONTENT)


def text_bytes(rng: random.Random, size: int) -> bytes:
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def disk_bytes(seed: int, size: int = 6 * 1024 * KiB + 1234) -> bytes:
    """Runs of random data, text and zeros, in 4 KiB-aligned runs, with a short last unit."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.choice(("random", "text", "zeros"))
        units = rng.randint(1, 64)
        if kind == "random":
            out += rng.randbytes(units * UNIT)
        elif kind == "text":
            out += text_bytes(rng, units * UNIT)
        else:
            out += bytes(units * UNIT)
    return bytes(out[:size])


def chunk_ids(store: Store, ref: str) -> list[bytes]:
    info = store.catalog.resolve(ref)
    return store.catalog.manifest(info.manifest_digest).entries[0].stored_digests()


# -- the chunker and the format ----------------------------------------------------------------------


def test_the_same_content_at_another_aligned_offset_gives_the_same_chunk_ids(tmp_path: Path) -> None:
    rng = random.Random(5)
    payload = rng.randbytes(3 * 1024 * KiB) + text_bytes(rng, 1024 * KiB)
    # Behind zeros (as a file system leaves free blocks) the payload is cut identically wherever it lands.
    a = bytes(40 * UNIT) + payload + bytes(3 * UNIT)
    b = bytes(7 * UNIT) + payload + bytes(30 * UNIT)
    # Behind other data the cut resynchronises after the first boundary inside the payload.
    c = rng.randbytes(13 * UNIT) + payload
    for name, data in (("a", a), ("b", b), ("c", c)):
        (tmp_path / name).write_bytes(data)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        refs = {}
        for name in ("a", "b", "c"):
            result = ingest(store, tmp_path / name, IngestOptions(f"os/{name}", chunking=Chunking.CONTENT))
            assert result.version is not None
            refs[name] = result.version.ref
        ids_a, ids_b, ids_c = (chunk_ids(store, refs[n]) for n in "abc")
        assert ids_a == ids_b
        assert len(ids_a) > 50
        shared = set(ids_a) & set(ids_c)
        # c's first chunk holds the 13 foreign units and some of the payload; every later one is shared.
        assert len(shared) >= len(ids_a) - 2, (len(shared), len(ids_a))
        # With fixed 64 KiB blocks, a shift of 33 units (not a multiple of 16) shares nothing.
        fixed = [IngestOptions(f"os/fixed-{n}", chunking=Chunking.FIXED) for n in "ab"]
        for name, options in zip("ab", fixed, strict=True):
            ingest(store, tmp_path / name, options)
        assert not set(chunk_ids(store, "os/fixed-a@1")) & set(chunk_ids(store, "os/fixed-b@1"))


def test_chunks_start_and_end_on_units_and_stay_between_the_minimum_and_the_maximum() -> None:
    rng = random.Random(9)
    data = rng.randbytes(2 * 1024 * KiB) + bytes(5 * UNIT) + text_bytes(rng, 1024 * KiB) + b"tail"
    for average in (16 * KiB, 32 * KiB, 64 * KiB):
        params = ChunkParams(UNIT, average)
        extents, used = cut(data, 0, params, final=True)
        assert used == len(data)
        position = 0
        for start, length, hole in extents:
            assert start == position and start % UNIT == 0
            position += length
            if hole:
                assert data[start : start + length] == bytes(length)
            else:
                assert length <= params.max_length
                assert length >= params.min_length or start + length in (len(data), 2 * 1024 * KiB)
        assert position == len(data)
        assert [e for e in extents if e[2]] == [(2 * 1024 * KiB, 5 * UNIT, True)]
        chunks = [e for e in extents if not e[2]]
        mean = sum(e[1] for e in chunks) / len(chunks)
        assert average * 0.6 < mean < average * 1.4, (average, mean)


def test_a_fixed_manifest_keeps_format_1_bytes_and_a_content_manifest_is_format_2_with_its_extents() -> None:
    digest = hashlib.sha256(b"x").digest()
    fixed = Manifest(65536, True, (FileEntry("disk.img", 1, 0o644, 70000, 5, blocks=digest + HOLE_DIGEST),))
    message = manifest_pb2.Manifest()
    message.ParseFromString(manifest_to_bytes(fixed))
    assert message.format == 1
    # What the encoder wrote before chunking modes existed: the same fields, nothing more.
    before = manifest_pb2.Manifest(format=1, block_size=65536, single_file=True, entries=[message.entries[0]])
    assert manifest_to_bytes(fixed) == before.SerializeToString(deterministic=True)

    entry = FileEntry(
        "disk.img", 1, 0o644, 9000, 5, blocks=digest + HOLE_DIGEST, extents=pack_extents([8192, 9000])
    )
    content = Manifest(131072, True, (entry,), Chunking.CONTENT, 4096, 32768)
    raw = manifest_to_bytes(content)
    message.ParseFromString(raw)
    assert (message.format, message.chunking, message.unit_size) == (2, 1, 4096)
    back = manifest_from_bytes(raw)
    assert back == content
    assert back.entries[0].span(1, back.block_size) == (8192, 9000)
    assert back.entries[0].block_at(8191, back.block_size) == 0
    assert back.entries[0].block_at(8192, back.block_size) == 1

    message.format = 3
    with pytest.raises(ValueError, match="manifest format 3 is not supported"):
        manifest_from_bytes(message.SerializeToString())
    message.format = 2
    message.entries[0].extents = pack_extents([9000, 8192])
    with pytest.raises(ValueError, match="not strictly increasing"):
        manifest_from_bytes(message.SerializeToString()).entries[0].ends()
    message.entries[0].extents = b""
    with pytest.raises(ValueError, match="extent index goes with content chunking"):
        manifest_from_bytes(message.SerializeToString())


# -- readers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        IngestOptions("os/disk", chunking=Chunking.FIXED),
        IngestOptions("os/disk", chunking=Chunking.FIXED, block_size=4 * KiB),
        IngestOptions("os/disk", chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, 16 * KiB)),
        IngestOptions("os/disk", chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, 32 * KiB)),
        IngestOptions("os/disk", chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, 64 * KiB)),
        IngestOptions("os/disk", chunking=Chunking.CONTENT, chunk_params=ChunkParams(8 * KiB, 64 * KiB)),
    ],
    ids=["fixed-64K", "fixed-4K", "content-16K", "content-32K", "content-64K", "content-unit-8K"],
)
def test_exports_of_every_chunking_mode_are_byte_identical_to_the_source(tmp_path, options) -> None:
    source = tmp_path / "disk.img"
    source.write_bytes(disk_bytes(1))
    sparse = tmp_path / "sparse.img"  # a sparse file: holes the ingest never reads
    with open(sparse, "wb") as f:
        f.truncate(20 * 1024 * KiB)
        f.seek(9 * 1024 * KiB + 3 * UNIT)
        f.write(disk_bytes(2, 300 * KiB))
    store_path = tmp_path / "store"
    with Store.open(store_path, writable=True, create=True) as store:
        for path, layer in ((source, "os/disk"), (sparse, "os/sparse")):
            result = ingest(store, path, IngestOptions(**{**_fields(options), "layer": layer}))
            assert result.version is not None
    for path, layer in ((source, "os/disk"), (sparse, "os/sparse")):
        run_cli(store_path, "export", layer, tmp_path / f"{layer.replace('/', '-')}.out")
        assert sha256_file(tmp_path / f"{layer.replace('/', '-')}.out") == sha256_file(path), layer
    assert run_cli(store_path, "fsck", "--json").json()["ok"]


def _fields(options: IngestOptions) -> dict[str, object]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def test_nbd_reads_at_random_offsets_across_chunk_boundaries_return_the_image_bytes(tmp_path) -> None:
    data = disk_bytes(3)
    (tmp_path / "disk.img").write_bytes(data)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        ingest(store, tmp_path / "disk.img", CONTENT)
        disk = open_disk(store, ["os/disk"])
        entry = store.catalog.manifest(store.catalog.resolve("os/disk").manifest_digest).entries[0]
        ends = list(entry.ends())
        rng = random.Random(4)
        for _ in range(300):
            if rng.random() < 0.5:  # straddle a chunk boundary
                boundary = rng.choice(ends[:-1])
                offset = max(0, boundary - rng.randint(1, 70 * KiB))
            else:
                offset = rng.randrange(len(data))
            length = min(rng.randint(1, 300 * KiB), len(data) - offset)
            assert bytes(disk.read_sync(offset, length)) == data[offset : offset + length], (offset, length)
        runs = disk.zero_runs(0, len(data), 10_000)
        position = 0
        for length, zeros in runs:
            if zeros:
                assert data[position : position + length] == bytes(length)
            position += length
        assert position == len(data)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (apt-get install qemu-utils)")
def test_qemu_img_compare_finds_a_served_content_chunked_ext4_image_identical(tmp_path) -> None:
    from tests.test_nbd_protocol import ServerThread
    from tests.test_nbd_qemu import make_tree

    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (apt-get install e2fsprogs)")
    make_tree(tmp_path / "tree", seed=3)
    image = tmp_path / "ext4.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-d", str(tmp_path / "tree"), "-F", str(image), "24M"], check=True, timeout=120
    )
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        ingest(store, image, CONTENT)
        server = ServerThread({"os": open_disk(store, ["os/disk"])})
        try:
            subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.url("os")],
                check=True,
                timeout=120,
                capture_output=True,
            )
        finally:
            server.stop()


async def test_http_range_gets_across_chunk_boundaries_return_the_image_bytes(tmp_path) -> None:
    data = disk_bytes(6)
    (tmp_path / "disk.img").write_bytes(data)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        ingest(store, tmp_path / "disk.img", CONTENT)
        entry = store.catalog.manifest(store.catalog.resolve("os/disk").manifest_digest).entries[0]
        ends = list(entry.ends())
        runner, address = await start_http(store, "127.0.0.1:0")
        url = f"http://{address}/v1/versions/os%2Fdisk@1/file"
        rng = random.Random(7)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
                async with client.get(url) as whole:
                    assert await whole.read() == data
                for _ in range(60):
                    start = max(0, rng.choice(ends[:-1]) - rng.randint(1, 40 * KiB))
                    stop = min(len(data), start + rng.randint(1, 3 * 1024 * KiB))
                    async with client.get(url, headers={"Range": f"bytes={start}-{stop - 1}"}) as reply:
                        assert reply.status == 206
                        assert await reply.read() == data[start:stop], (start, stop)
        finally:
            await runner.cleanup()
        await asyncio.sleep(0)


# -- re-ingest -------------------------------------------------------------------------------------


def test_a_re_ingest_reuses_unchanged_chunks_without_hashing_them_and_stores_only_new_ones(tmp_path) -> None:
    v1 = bytearray(disk_bytes(8))
    (tmp_path / "v1.img").write_bytes(v1)
    v2 = bytearray(v1)
    v2[2 * 1024 * KiB : 2 * 1024 * KiB + 10] = b"0123456789"  # one chunk changes
    (tmp_path / "v2.img").write_bytes(v2)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        first = ingest(store, tmp_path / "v1.img", CONTENT)
        second = ingest(store, tmp_path / "v2.img", IngestOptions("os/disk"))  # the layer's own chunking
        assert second.version is not None
        manifest = store.catalog.manifest(second.version.manifest_digest)
        assert manifest.chunking == Chunking.CONTENT
        data_chunks = first.blocks - first.holes
        assert second.reused == data_chunks - 1, (second.reused, data_chunks)
        assert second.new_blocks == 1 and second.deduplicated == 0
        with pytest.raises(InvalidInput, match="uses content chunking; a layer's chunking is fixed"):
            ingest(store, tmp_path / "v2.img", IngestOptions("os/disk", chunking=Chunking.FIXED))


# -- a store written before content chunks, and replication --------------------------------------------


def test_a_store_written_before_content_chunks_takes_new_fixed_versions_and_replicates(tmp_path) -> None:
    from tests.test_store_format import DISK_SHA256, unpack

    old = unpack(tmp_path / "old")
    run_cli(old, "export", "os/fixture", tmp_path / "v1.img")
    with open(tmp_path / "v1.img", "r+b") as f:
        f.write(b"changed")
    # The layer keeps its fixed blocks (whatever the config asks of new layers) and its pre-filter works.
    config = tmp_path / "content.toml"
    config.write_text('chunking = "content"\n')
    env = cli_env(old) | {"CACHEPOINT_CONFIG": str(config)}
    ingested = subprocess.run(
        [*_cli(), "ingest", "os/fixture", str(tmp_path / "v1.img"), "--tag", "production", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=True,
    )
    result = json.loads(ingested.stdout)
    assert (result["version"], result["new_blocks"]) == (2, 1), result
    with Store.open(old) as store:
        assert store.catalog.manifest(store.catalog.resolve("os/fixture@2").manifest_digest).chunking == 0
    # Another node pulls both versions from a daemon serving the old store.
    new = tmp_path / "new"
    with daemon(old) as ready:
        for ref in ("os/fixture@1", "os/fixture@2"):
            run_cli(new, "pull", ref, "--from", str(ready["listening"]))
    assert export_digest(new, "os/fixture@1", tmp_path / "pulled-1.img") == DISK_SHA256
    assert export_digest(new, "os/fixture@2", tmp_path / "pulled-2.img") == sha256_file(tmp_path / "v1.img")
    assert run_cli(new, "fsck", "--json").json()["ok"]


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "cachepoint"]


def test_a_content_chunked_layer_replicates_between_daemons_moving_only_its_new_chunks(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    v1 = disk_bytes(11, 12 * 1024 * KiB)
    (images / "v1.img").write_bytes(v1)
    # v2: the same data, moved by 5 units past an inserted run, plus a rewritten region.
    rng = random.Random(12)
    v2 = bytearray(v1[: 4 * 1024 * KiB] + rng.randbytes(5 * UNIT) + v1[4 * 1024 * KiB :])
    v2[9 * 1024 * KiB : 9 * 1024 * KiB + 64 * KiB] = rng.randbytes(64 * KiB)
    (images / "v2.img").write_bytes(bytes(v2))
    admin = tmp_path / "admin"
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        node = fleet.cachepoint("n1", coordinator.address, subscribe=("os/x:production",))
        sent = []
        for name in ("v1.img", "v2.img"):
            out = cli_json(
                admin, "publish", "os/x", images / name, "--coordinator", coordinator.address,
                "--chunking", "content", "--tag", "production",
            )  # fmt: skip
            sent.append(out)
            fleet.wait_holds(node, out["version"])
        with Store.open(admin) as store:
            new_chunks = set(chunk_ids(store, "os/x@2")) - set(chunk_ids(store, "os/x@1"))
            manifest = store.catalog.manifest(store.catalog.resolve("os/x@2").manifest_digest)
        assert manifest.chunking == Chunking.CONTENT
        # The shift costs a chunk or two around the insertion, the rewrite a few: not the whole tail.
        assert 0 < len(new_chunks) <= 12, len(new_chunks)
        assert sent[1]["blocks_sent"] == len(new_chunks), sent[1]
        exports = tmp_path / "exports"
        exports.mkdir()
        assert export_digest(node.store, "os/x@2", exports / "v2.img") == hashlib.sha256(v2).hexdigest()
        assert export_digest(node.store, "os/x@1", exports / "v1.img") == hashlib.sha256(v1).hexdigest()


def test_a_re_ingest_cuts_exactly_as_a_first_ingest_of_the_same_image(tmp_path) -> None:
    rng = random.Random(21)
    v1 = disk_bytes(22, 9 * 1024 * KiB)
    # v2: units inserted (data after them moves), a hole filled, a region rewritten, a longer tail.
    v2 = bytearray(v1[: 1024 * KiB] + rng.randbytes(3 * UNIT) + v1[1024 * KiB :])
    zeros = v2.find(bytes(8 * UNIT), 2 * 1024 * KiB)
    if zeros > 0:
        v2[zeros : zeros + 2 * UNIT] = rng.randbytes(2 * UNIT)
    v2[6 * 1024 * KiB : 6 * 1024 * KiB + 50 * KiB] = text_bytes(rng, 50 * KiB)
    v2 += rng.randbytes(5 * UNIT + 77)
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.img").write_bytes(bytes(v2))
    with Store.open(tmp_path / "again", writable=True, create=True) as store:
        ingest(store, tmp_path / "v1.img", CONTENT)
        again = ingest(store, tmp_path / "v2.img", IngestOptions("os/disk"))
        # The pre-filter matches by offset: every chunk of v1 that ends before the insertion (1 MiB in)
        # is taken again without SHA-256, whatever the average cut it.
        entry = store.catalog.manifest(store.catalog.resolve("os/disk@1").manifest_digest).entries[0]
        ends, ids = entry.ends(), entry.digests()
        before = sum(
            1 for end, digest in zip(ends, ids, strict=True) if end <= 1024 * KiB and digest != HOLE_DIGEST
        )
        assert again.version is not None and before > 0 and again.reused >= before, (again.reused, before)
        reingested = store.catalog.manifest_bytes(again.version.manifest_digest)
    with Store.open(tmp_path / "fresh", writable=True, create=True) as store:
        fresh = ingest(store, tmp_path / "v2.img", CONTENT)
        assert fresh.version is not None and fresh.reused == 0
        first = store.catalog.manifest_bytes(fresh.version.manifest_digest)
    assert reingested == first
    run_cli(tmp_path / "again", "export", "os/disk", tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == hashlib.sha256(v2).hexdigest()


def _one_piece(data: bytes, params: ChunkParams) -> tuple[bytes, bytes]:
    """The block ids and extent index of ``data`` cut in one call (no windows), holes merged."""
    extents, _ = cut(data, 0, params, final=True)
    ids = [
        HOLE_DIGEST if hole else hashlib.sha256(data[at : at + n]).digest()
        for at, n, hole in merge_holes(extents)
    ]
    return b"".join(ids), pack_extents([at + n for at, n, _ in merge_holes(extents)])


def test_an_image_of_many_windows_is_cut_as_in_one_piece_and_so_is_its_re_ingest(
    tmp_path, monkeypatch
) -> None:
    # Small windows: the unfinished chunk at each window's end moves into the next window's buffer,
    # and buffers are reused once their chunks are stored, many times over.
    monkeypatch.setattr(chunked, "JOB_BYTES", 64 * KiB)
    params = ChunkParams(UNIT, 16 * KiB)  # 64 KiB windows, as long as a chunk may be (max_length)
    rng = random.Random(31)
    v1 = disk_bytes(31, 5 * 1024 * KiB + 555)
    v2 = bytearray(v1[: 700 * KiB] + rng.randbytes(5 * UNIT) + v1[700 * KiB :])  # later data moves
    v2[3 * 1024 * KiB : 3 * 1024 * KiB + 40 * KiB] = text_bytes(rng, 40 * KiB)
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.img").write_bytes(bytes(v2))
    options = IngestOptions("os/disk", chunking=Chunking.CONTENT, chunk_params=params, workers=2)
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        for path, data, opts in (
            (tmp_path / "v1.img", v1, options),
            (tmp_path / "v2.img", bytes(v2), IngestOptions("os/disk")),
        ):
            result = ingest(store, path, opts)
            assert result.version is not None
            entry = store.catalog.manifest(result.version.manifest_digest).entries[0]
            assert (entry.blocks, entry.extents) == _one_piece(data, params), path.name
        assert result.reused > 20 and result.deduplicated > 100, result  # before the insertion; after it
    run_cli(tmp_path / "store", "export", "os/disk", tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == hashlib.sha256(v2).hexdigest()


@pytest.mark.parametrize("chunking", [Chunking.FIXED, Chunking.CONTENT], ids=["fixed", "content"])
def test_an_image_whose_tail_was_never_written_is_read_only_where_it_has_data(tmp_path, chunking) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(disk_bytes(41, 1024 * KiB))
        f.truncate(40 * 1024 * KiB)  # the rest was never written: a hole up to the end of the file
    with open(image, "rb") as f:
        try:
            os.lseek(f.fileno(), 8 * 1024 * KiB, os.SEEK_DATA)
            pytest.skip("this file system does not report holes (SEEK_DATA)")
        except OSError as err:
            assert err.errno == errno.ENXIO
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        result = ingest(store, image, IngestOptions("os/disk", chunking=chunking))
        assert result.version is not None
    # One window (4 MiB) holds the data; the 36 MiB of hole after it are not read as zeros.
    assert result.bytes_read <= 4 * 1024 * KiB, result.bytes_read
    run_cli(tmp_path / "store", "export", "os/disk", tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)


@pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")),
    reason="needs qemu-utils (make test installs it)",
)
def test_a_lazily_attached_content_chunked_image_fetches_the_chunks_a_read_needs_and_copies_whole(
    tmp_path,
) -> None:
    from cachepoint.disk.composite import READAHEAD_BLOCKS

    data = disk_bytes(31, 12 * 1024 * KiB)
    image = tmp_path / "os.img"
    image.write_bytes(data)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        cli_json(
            tmp_path / "admin", "publish", "os/x", image, "--coordinator", coordinator.address,
            "--chunking", "content", "--tag", "production",
        )  # fmt: skip
        with Store.open(tmp_path / "admin") as admin:
            entry = admin.catalog.manifest(admin.catalog.resolve("os/x@1").manifest_digest).entries[0]
        stored = len(set(entry.stored_digests()))
        # A read straddling the boundary between two data chunks in the middle of the image.
        index = next(
            i for i in range(entry.block_count // 2, entry.block_count - 1)
            if HOLE_DIGEST not in (entry.digest_at(i), entry.digest_at(i + 1))
        )  # fmt: skip
        boundary = entry.span(index, 0)[1]
        store = tmp_path / "blade"
        with daemon(store, "--nbd", "127.0.0.1:0", "--coordinator", coordinator.address):
            attached = run_cli(store, "attach", "os/x:production", "--json").json()

            def fetched() -> int:
                status = run_cli(store, "status", "--json").json()
                return sum(s["blocks"] for s in status["bytes_by_source"].values())

            assert fetched() == 0
            read = subprocess.run(
                ["qemu-io", "-r", "-f", "raw", "-c", f"read -v {boundary - 512} 1024", attached["nbd"]],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert read.returncode == 0, read.stderr
            assert 2 <= fetched() <= 2 + READAHEAD_BLOCKS < stored, (fetched(), stored)
            copy = tmp_path / "copy.raw"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", attached["nbd"], str(copy)],
                check=True,
                timeout=300,
                capture_output=True,
            )
            assert sha256_file(copy) == hashlib.sha256(data).hexdigest()
            assert fetched() == stored, "each chunk was fetched once"
