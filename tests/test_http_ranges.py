"""HTTP: whole and partial GETs of a disk image version, validators, and blocks that fail to verify.

The fixtures here (a store with a disk layer, a tree layer and an image; a server on loopback; a
client) are shared by the other tests/test_http_*.py modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from cachepoint.blocks import CODEC_ZSTD
from cachepoint.http.app import start_http
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import LayerKind
from cachepoint.store.store import Store

BS = 64 * 1024
DISK_SIZE = 50 * BS + 12_345  # the last block is short
HOLE_BLOCKS = range(20, 28)  # all zeros: a hole in the manifest, never stored
UPPER_SIZE = DISK_SIZE + 2 * BS + 7  # the user layer is larger than the OS layer below it
TIMEOUT = aiohttp.ClientTimeout(total=60)
DISK = "/v1/versions/os%2Fdisk@1/file"


@dataclass(frozen=True)
class Sources:
    """What the test store was built from."""

    root: Path
    disk: bytes
    upper: bytes
    tree: Path
    tool: bytes


def _disk_bytes(seed: int, size: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[HOLE_BLOCKS.start * BS : HOLE_BLOCKS.stop * BS] = bytes(len(HOLE_BLOCKS) * BS)
    return bytes(data)


def _upper_bytes() -> bytes:
    # Data in every third block, holes elsewhere: the blocks below show through the holes.
    rng = random.Random(99)
    blocks = -(-UPPER_SIZE // BS)
    data = b"".join(rng.randbytes(BS) if i % 3 == 0 else bytes(BS) for i in range(blocks))
    return data[:UPPER_SIZE]


def build_store(root: Path, work: Path) -> Sources:
    """Layers os/disk (2 versions), user/alice/disk, app/tree and images alice (disk) and tools (tree),
    through the Python API."""
    work.mkdir(parents=True, exist_ok=True)
    disk = _disk_bytes(7, DISK_SIZE)
    upper = _upper_bytes()
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "bin").mkdir()
    (tree / "var" / "lib").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello from the tree\n")
    tool = random.Random(3).randbytes(200_000)
    (tree / "bin" / "tool").write_bytes(tool)
    (tree / "empty").write_bytes(b"")
    (tree / "link").symlink_to("etc/motd")
    with Store.open(root, writable=True, create=True) as store:
        for name, layer, data, kind in (
            ("os1.img", "os/disk", disk, LayerKind.OS),
            ("os2.img", "os/disk", _disk_bytes(8, DISK_SIZE), LayerKind.OS),
            ("user.img", "user/alice/disk", upper, LayerKind.USER),
        ):
            (work / name).write_bytes(data)
            ingest(store, work / name, IngestOptions(layer=layer, kind=kind, tags=("production",)))
        store.catalog.set_tag("os/disk@1", "production", "test")
        ingest(store, tree, IngestOptions(layer="app/tree"))
        store.catalog.create_image("alice", ["os/disk:production", "user/alice/disk"])
        store.catalog.create_image("tools", ["app/tree"])
    return Sources(root, disk, upper, tree, tool)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    base = tmp_path_factory.mktemp("http")
    return build_store(base / "store", base / "work")


@pytest.fixture(scope="module")
def store(sources: Sources) -> Iterator[Store]:
    with Store.open(sources.root) as opened:
        yield opened


@pytest.fixture
async def base_url(store: Store) -> AsyncIterator[str]:
    runner, address = await start_http(store, "127.0.0.1:0")
    try:
        yield f"http://{address}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> dict[str, object]:
        import json

        return json.loads(self.body)


async def fetch(client: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str) -> Reply:
    async with client.request(method, url, headers=headers) as response:
        return Reply(response.status, response.headers, await response.read())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/byteranges body by hand (RFC 9110 §14.6, RFC 2046 §5.1.1)."""
    kind, _, param = content_type.partition(";")
    assert kind.strip() == "multipart/byteranges"
    name, _, boundary = param.strip().partition("=")
    assert name == "boundary" and boundary
    delimiter = b"--" + boundary.encode()
    assert body.startswith(delimiter + b"\r\n"), body[:80]
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n"), body[-80:]
    inner = body[len(delimiter) + 2 : -(len(delimiter) + 6)]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, data = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        parts.append((headers, data))
    return parts


# -- whole objects ---------------------------------------------------------------------------------


async def test_a_whole_get_of_a_disk_version_returns_its_exact_bytes(base_url, client, sources):
    reply = await fetch(client, base_url + DISK)
    assert reply.status == 200
    assert sha(reply.body) == sha(sources.disk)
    assert reply.headers["Content-Length"] == str(DISK_SIZE)
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Cachepoint-Ref"] == "os/disk@1"


async def test_head_sends_the_get_headers_without_a_body(base_url, client, store):
    get = await fetch(client, base_url + DISK)
    head = await fetch(client, base_url + DISK, "HEAD")
    assert head.status == 200 and head.body == b""
    for name in ("Content-Length", "Content-Type", "ETag", "Accept-Ranges", "Cachepoint-Ref"):
        assert head.headers[name] == get.headers[name], name
    info = store.catalog.resolve("os/disk@1")
    assert head.headers["ETag"] == f'"{info.manifest_digest.hex()}"'
    ranged = await fetch(client, base_url + DISK, "HEAD", Range="bytes=10-19")
    assert ranged.status == 206 and ranged.body == b""
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{DISK_SIZE}"
    assert ranged.headers["Content-Length"] == "10"


async def test_a_tag_a_bare_layer_and_an_encoded_at_sign_name_the_versions_they_resolve_to(
    base_url, client, sources
):
    production = await fetch(client, base_url + "/v1/versions/os%2Fdisk:production/file")
    assert production.headers["Cachepoint-Ref"] == "os/disk@1"
    assert production.body == sources.disk
    latest = await fetch(client, base_url + "/v1/versions/os%2Fdisk/file", "HEAD")
    assert latest.headers["Cachepoint-Ref"] == "os/disk@2"
    assert latest.headers["ETag"] != production.headers["ETag"]
    encoded = await fetch(client, base_url + "/v1/versions/os%2Fdisk%40%31/file", "HEAD")
    assert encoded.status == 200 and encoded.headers["ETag"] == production.headers["ETag"]


# -- single ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=65530-65545", 65530, 65546),  # across a block boundary
        ("bytes=3000000-", 3000000, DISK_SIZE),  # open-ended
        ("bytes=-5000", DISK_SIZE - 5000, DISK_SIZE),  # suffix: the short last block and the one before
        ("bytes=100-99999999", 100, DISK_SIZE),  # the end is clamped to the object
        ("bytes=-99999999", 0, DISK_SIZE),  # a suffix longer than the object is all of it
    ],
)
async def test_a_single_range_is_a_206_with_its_content_range(base_url, client, sources, header, start, stop):
    reply = await fetch(client, base_url + DISK, Range=header)
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{DISK_SIZE}"
    assert reply.headers["Content-Length"] == str(stop - start)
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.body == sources.disk[start:stop]


async def test_a_range_reads_only_the_blocks_it_covers_and_never_reads_holes(
    base_url, client, sources, store, monkeypatch
):
    asked: list[list[bytes]] = []
    real = store.blocks.raw_many

    def spy(digests: list[bytes]) -> list[bytes | None]:
        asked.append(list(digests))
        return real(digests)

    monkeypatch.setattr(store.blocks, "raw_many", spy)
    # Inside the hole: zeros, and no read at all.
    inside = await fetch(client, base_url + DISK, Range=f"bytes={21 * BS + 5}-{26 * BS}")
    assert inside.status == 206 and inside.body == bytes(5 * BS - 4)
    assert asked == []
    # From the middle of block 19, across the hole, into block 28: only blocks 19 and 28 are read.
    start, stop = 19 * BS + 1000, 28 * BS + 2000
    across = await fetch(client, base_url + DISK, Range=f"bytes={start}-{stop - 1}")
    assert across.status == 206 and across.body == sources.disk[start:stop]
    assert sum(len(batch) for batch in asked) == 2
    # Three bytes in one block: one block read.
    asked.clear()
    few = await fetch(client, base_url + DISK, Range="bytes=200000-200002")
    assert few.body == sources.disk[200000:200003]
    assert [len(batch) for batch in asked] == [1]


async def test_a_whole_get_reads_in_batches_of_about_one_mebibyte(
    base_url, client, sources, store, monkeypatch
):
    sizes: list[int] = []
    real = store.blocks.raw_many

    def spy(digests: list[bytes]) -> list[bytes | None]:
        sizes.append(len(digests))
        return real(digests)

    monkeypatch.setattr(store.blocks, "raw_many", spy)
    reply = await fetch(client, base_url + DISK)
    assert reply.body == sources.disk
    stored_blocks = -(-DISK_SIZE // BS) - len(HOLE_BLOCKS)
    assert sum(sizes) == stored_blocks  # each stored block once, holes never
    assert max(sizes) == (1 << 20) // BS


# -- several ranges --------------------------------------------------------------------------------


async def test_several_ranges_come_back_as_multipart_byteranges_in_the_order_asked(base_url, client, sources):
    wanted = [(2_000_000, 2_000_099), (0, 9), (HOLE_BLOCKS.start * BS - 10, HOLE_BLOCKS.start * BS + 10)]
    header = "bytes=" + ", ".join(f"{a}-{b}" for a, b in wanted) + ",-7"
    reply = await fetch(client, base_url + DISK, Range=header)
    assert reply.status == 206
    assert "Content-Range" not in reply.headers
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    parts = parse_multipart(reply.body, reply.headers["Content-Type"])
    expected = [*wanted, (DISK_SIZE - 7, DISK_SIZE - 1)]
    assert len(parts) == len(expected)
    for (headers, data), (a, b) in zip(parts, expected, strict=True):
        assert headers["Content-Range"] == f"bytes {a}-{b}/{DISK_SIZE}"
        assert headers["Content-Type"] == "application/octet-stream"
        assert data == sources.disk[a : b + 1]


async def test_overlapping_ranges_are_coalesced_so_no_byte_is_sent_twice(base_url, client, sources):
    reply = await fetch(client, base_url + DISK, Range="bytes=500-999,0-600,2000-2099,1000-1099")
    parts = parse_multipart(reply.body, reply.headers["Content-Type"])
    assert [h["Content-Range"] for h, _ in parts] == [
        f"bytes 0-1099/{DISK_SIZE}",
        f"bytes 2000-2099/{DISK_SIZE}",
    ]
    assert parts[0][1] == sources.disk[:1100] and parts[1][1] == sources.disk[2000:2100]
    merged = await fetch(client, base_url + DISK, Range="bytes=0-99,50-199")
    assert merged.headers["Content-Range"] == f"bytes 0-199/{DISK_SIZE}"  # one range left: not multipart
    assert merged.body == sources.disk[:200]


async def test_unsatisfiable_ranges_are_dropped_and_only_those_is_a_416(base_url, client, sources):
    some = await fetch(client, base_url + DISK, Range=f"bytes={DISK_SIZE}-,10-19")
    assert some.status == 206 and some.headers["Content-Range"] == f"bytes 10-19/{DISK_SIZE}"
    assert some.body == sources.disk[10:20]
    for header in (f"bytes={DISK_SIZE}-", f"bytes={DISK_SIZE + 5}-{DISK_SIZE + 10}", "bytes=-0"):
        none = await fetch(client, base_url + DISK, Range=header)
        assert none.status == 416, header
        assert none.headers["Content-Range"] == f"bytes */{DISK_SIZE}"
        assert "overlaps" in none.json()["error"]


@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "bytes=5-2",
        "bytes=-",
        "items=0-9",
        "bytes 0-9",
        "bytes=",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=0x10-20",
    ],
)
async def test_a_malformed_range_is_ignored_and_the_whole_object_is_sent(base_url, client, sources, header):
    reply = await fetch(client, base_url + DISK, Range=header)
    assert reply.status == 200
    assert "Content-Range" not in reply.headers
    assert sha(reply.body) == sha(sources.disk)


# -- validators ------------------------------------------------------------------------------------


async def test_if_none_match_with_the_current_etag_is_a_304_without_a_body(base_url, client):
    etag = (await fetch(client, base_url + DISK, "HEAD")).headers["ETag"]
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        reply = await fetch(client, base_url + DISK, **{"If-None-Match": header})
        assert reply.status == 304, header
        assert reply.body == b"" and reply.headers["ETag"] == etag
    stale = await fetch(client, base_url + DISK, **{"If-None-Match": '"stale"', "Range": "bytes=0-9"})
    assert stale.status == 206 and len(stale.body) == 10
    # The ETag follows the version a tag names, so a cached copy of an older one is not reused.
    latest = await fetch(client, base_url + "/v1/versions/os%2Fdisk/file", **{"If-None-Match": etag})
    assert latest.status == 200


async def test_if_range_honours_the_range_only_for_the_exact_strong_etag(base_url, client, sources):
    etag = (await fetch(client, base_url + DISK, "HEAD")).headers["ETag"]
    matching = await fetch(client, base_url + DISK, Range="bytes=5-9", **{"If-Range": etag})
    assert matching.status == 206 and matching.body == sources.disk[5:10]
    for validator in ('"something-else"', f"W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT"):
        other = await fetch(client, base_url + DISK, Range="bytes=5-9", **{"If-Range": validator})
        assert other.status == 200, validator
        assert sha(other.body) == sha(sources.disk)


# -- blocks that fail verification -----------------------------------------------------------------


@pytest.fixture
def corrupt_store(tmp_path: Path) -> Iterator[tuple[Store, bytes, list[str]]]:
    """A disk layer whose block 0 and block 30 hold values that cannot be decoded (damage a read must
    catch: local reads do not hash, a value that decodes to other bytes is the scrub's to find)."""
    data = os.urandom(40 * BS)
    (tmp_path / "d.img").write_bytes(data)
    with Store.open(tmp_path / "store", writable=True, create=True) as writable:
        result = ingest(writable, tmp_path / "d.img", IngestOptions(layer="os/bad", kind=LayerKind.OS))
        assert result.version is not None
        entry = writable.catalog.manifest(result.version.manifest_digest).entries[0]
        bad = [entry.digest_at(0), entry.digest_at(30)]
        undecodable = bytes((CODEC_ZSTD,)) + bytes(4) + os.urandom(BS)  # no zstd frame magic
        writable.blocks.put_many([(d, undecodable) for d in bad], durable=True)
    with Store.open(tmp_path / "store") as opened:
        yield opened, data, ["sha256:" + d.hex() for d in bad]


async def test_a_corrupt_first_block_is_a_500_naming_it_before_any_byte_is_sent(
    corrupt_store, client, caplog
):
    store, _, bad = corrupt_store
    runner, address = await start_http(store, "127.0.0.1:0")
    try:
        with caplog.at_level(logging.ERROR, "cachepoint.http"):
            reply = await fetch(client, f"http://{address}/v1/versions/os%2Fbad@1/file", Range="bytes=10-20")
        assert reply.status == 500
        assert reply.json()["type"] == "BlockCorrupt" and bad[0] in reply.json()["error"]
        assert bad[0] in caplog.text
        fine = await fetch(
            client, f"http://{address}/v1/versions/os%2Fbad@1/file", Range=f"bytes={BS}-{BS + 9}"
        )
        assert fine.status == 206, "a healthy range of the same file is still served"
    finally:
        await runner.cleanup()


async def test_a_corrupt_block_after_the_headers_cuts_the_response_short_and_is_logged(
    corrupt_store, client, caplog
):
    store, data, bad = corrupt_store
    runner, address = await start_http(store, "127.0.0.1:0")
    url = f"http://{address}/v1/versions/os%2Fbad@1/file"
    try:
        with caplog.at_level(logging.ERROR, "cachepoint.http"):
            async with client.get(url, headers={"Range": f"bytes={BS}-"}) as response:
                assert response.status == 206
                received = bytearray()
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in response.content.iter_any():
                        received += chunk
        assert len(received) < len(data) - BS, "the client must not see a complete body"
        assert received == data[BS : BS + len(received)], "what was sent before the bad block is right"
        assert bad[1] in caplog.text and "aborted" in caplog.text
        # The server goes on serving other requests.
        again = await fetch(client, url, Range=f"bytes={BS}-{2 * BS - 1}")
        assert again.status == 206 and again.body == data[BS : 2 * BS]
    finally:
        await runner.cleanup()


async def test_a_layer_with_blocks_larger_than_a_chunk_is_served_a_block_at_a_time(tmp_path, client):
    big = 4 << 20
    data = bytearray(os.urandom(3 * big + 1000))
    data[big : 2 * big] = bytes(big)  # a whole 4 MiB hole
    (tmp_path / "big.img").write_bytes(data)
    options = IngestOptions(layer="os/big", kind=LayerKind.OS, new_layer_block_size=big)
    with Store.open(tmp_path / "store", writable=True, create=True) as writable:
        ingest(writable, tmp_path / "big.img", options)
    with Store.open(tmp_path / "store") as opened:
        runner, address = await start_http(opened, "127.0.0.1:0")
        url = f"http://{address}/v1/versions/os%2Fbig@1/file"
        try:
            whole = await fetch(client, url)
            assert sha(whole.body) == sha(bytes(data))
            hole = await fetch(client, url, Range=f"bytes={big - 10}-{2 * big + 9}")
            assert hole.body == data[big - 10 : 2 * big + 10]
        finally:
            await runner.cleanup()


async def test_a_client_that_hangs_up_mid_download_leaves_the_server_serving_and_quiet(
    tmp_path, client, caplog
):
    size = 256 << 20  # far more than loopback socket buffers hold, so the server sees the hang-up
    with open(tmp_path / "sparse.img", "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 8 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
    with Store.open(tmp_path / "store", writable=True, create=True) as writable:
        ingest(writable, tmp_path / "sparse.img", IngestOptions(layer="os/sparse", kind=LayerKind.OS))
    with Store.open(tmp_path / "store") as opened:
        runner, address = await start_http(opened, "127.0.0.1:0")
        try:
            with caplog.at_level(logging.DEBUG, "cachepoint.http"):
                async with client.get(f"http://{address}/v1/versions/os%2Fsparse@1/file") as response:
                    assert response.status == 200
                    await response.content.readexactly(2 << 20)
                    response.close()  # drop the connection with most of the body unsent
                for _ in range(100):  # bounded wait for the handler to notice
                    if "went away" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
            assert "went away" in caplog.text
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
            health = await fetch(client, f"http://{address}/healthz")
            assert health.status == 200
        finally:
            await runner.cleanup()
