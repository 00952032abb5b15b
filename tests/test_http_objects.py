"""HTTP: tree files by path, composite image disks, health, and how unknown or malformed names fail."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachepoint.http.app import start_http
from cachepoint.store.store import Store
from tests import test_http_ranges as common
from tests.conftest import run_cli
from tests.test_http_ranges import BS, DISK_SIZE, UPPER_SIZE, fetch, sha

# The shared fixtures, found by pytest under these names.
sources = common.sources
store = common.store
base_url = common.base_url
client = common.client

TOOL = "/v1/versions/app%2Ftree@1/files/bin/tool"

# -- watching for filesystem access --------------------------------------------------------------

_opened: list[list[object]] = []
_hooked: list[bool] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _opened and event in ("open", "os.listdir", "os.scandir", "os.readlink"):
        _opened[-1].append(args[0])


@contextlib.contextmanager
def watching_opens() -> Iterator[list[object]]:
    """Paths Python opens or lists (in any thread) while the block runs."""
    if not _hooked:
        # Audit hooks cannot be removed: install it on first use only, and it records only in here.
        sys.addaudithook(_audit)
        _hooked.append(True)
    seen: list[object] = []
    _opened.append(seen)
    try:
        yield seen
    finally:
        _opened.remove(seen)


async def raw_get(address: str, target: str) -> tuple[int, bytes]:
    """A GET with the request target sent exactly as given: clients normalise '..' away."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- tree files ------------------------------------------------------------------------------------


async def test_a_tree_file_is_served_by_its_manifest_path_with_ranges(base_url, client, sources):
    motd = await fetch(client, base_url + "/v1/versions/app%2Ftree@1/files/etc/motd")
    assert motd.status == 200 and motd.body == b"hello from the tree\n"
    tool = await fetch(client, base_url + TOOL)
    assert sha(tool.body) == sha(sources.tool)
    part = await fetch(client, base_url + TOOL, Range=f"bytes={BS - 3}-{BS + 2}")
    assert part.status == 206 and part.body == sources.tool[BS - 3 : BS + 3]
    empty = await fetch(client, base_url + "/v1/versions/app%2Ftree/files/empty", Range="bytes=0-10")
    assert empty.status == 200 and empty.body == b"" and empty.headers["Content-Length"] == "0"
    # An encoded '/' in the path is the same path.
    encoded = await fetch(client, base_url + "/v1/versions/app%2Ftree@1/files/bin%2Ftool", "HEAD")
    assert encoded.status == 200 and encoded.headers["ETag"] == tool.headers["ETag"]


async def test_each_tree_file_has_its_own_etag_and_it_answers_if_none_match(base_url, client):
    motd = await fetch(client, base_url + "/v1/versions/app%2Ftree@1/files/etc/motd", "HEAD")
    tool = await fetch(client, base_url + TOOL, "HEAD")
    assert motd.headers["ETag"] != tool.headers["ETag"]
    cached = await fetch(client, base_url + TOOL, **{"If-None-Match": tool.headers["ETag"]})
    assert cached.status == 304 and cached.body == b""


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("nope", 404, "has no file 'nope'"),
        ("etc", 404, "is a directory"),
        ("var/lib", 404, "is a directory"),
        ("link", 404, "is a symlink"),
    ],
)
async def test_a_missing_path_a_directory_or_a_symlink_is_a_404_saying_so(
    base_url, client, path, status, words
):
    reply = await fetch(client, base_url + f"/v1/versions/app%2Ftree@1/files/{path}")
    assert reply.status == status
    assert words in reply.json()["error"] and "app/tree@1" in reply.json()["error"]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/versions/app%2Ftree@1/files/../../../etc/passwd",
        "/v1/versions/app%2Ftree@1/files/etc/../../etc/passwd",
        "/v1/versions/app%2Ftree@1/files/%2e%2e/%2e%2e/etc/passwd",
        "/v1/versions/app%2Ftree@1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/versions/app%2Ftree@1/files/%2fetc%2fpasswd",
        "/v1/versions/app%2Ftree@1/files//etc/passwd",
        "/v1/versions/app%2Ftree@1/files/etc/./motd",
        "/v1/versions/app%2Ftree@1/files/etc%00/motd",
    ],
)
async def test_path_traversal_is_refused_without_touching_the_filesystem(base_url, target):
    address = base_url.removeprefix("http://")
    with watching_opens() as opened:
        status, body = await raw_get(address, target)
    assert status in (400, 404), body
    assert b"root:" not in body
    assert opened == [], f"the server opened {opened}"


async def test_traversal_that_the_client_normalises_lands_nowhere(base_url, client):
    # aiohttp's client removes dot segments before sending: the result is an unknown route.
    reply = await fetch(client, base_url + "/v1/versions/app%2Ftree@1/files/../../../../etc/passwd")
    assert reply.status == 404 and reply.json()["type"] == "HTTPError"


async def test_asking_a_tree_for_its_file_or_a_disk_for_a_path_is_a_400_naming_the_right_route(
    base_url, client
):
    tree = await fetch(client, base_url + "/v1/versions/app%2Ftree@1/file")
    assert (
        tree.status == 400 and "a tree layer" in tree.json()["error"] and "files/PATH" in tree.json()["error"]
    )
    disk = await fetch(client, base_url + "/v1/versions/os%2Fdisk@1/files/os1.img")
    assert disk.status == 400 and "disk image layer" in disk.json()["error"]
    image = await fetch(client, base_url + "/v1/images/tools/disk")
    assert image.status == 400 and "app/tree@1" in image.json()["error"]


# -- images ----------------------------------------------------------------------------------------


async def test_an_image_disk_equals_what_cachepoint_image_export_writes(base_url, client, sources, tmp_path):
    exported = tmp_path / "alice.img"
    await asyncio.to_thread(run_cli, sources.root, "image", "export", "alice", exported)
    expected = exported.read_bytes()
    assert len(expected) == UPPER_SIZE
    reply = await fetch(client, base_url + "/v1/images/alice/disk")
    assert reply.status == 200
    assert reply.headers["Cachepoint-Ref"] == "os/disk@1 user/alice/disk@1"
    assert sha(reply.body) == sha(expected)
    # Around the end of the lower layer's short last block, which the upper layer's hole shows.
    start = DISK_SIZE - 100
    part = await fetch(client, base_url + "/v1/images/alice/disk", Range=f"bytes={start}-{start + 199}")
    assert part.status == 206 and part.body == expected[start : start + 200]


async def test_an_image_etag_changes_when_a_tag_in_its_stack_moves(base_url, client, sources, tmp_path):
    before = await fetch(client, base_url + "/v1/images/alice/disk", "HEAD")
    again = await fetch(client, base_url + "/v1/images/alice/disk", "HEAD")
    assert before.headers["ETag"] == again.headers["ETag"]
    moved = tmp_path / "moved"
    await asyncio.to_thread(_copy_and_retag, sources.root, moved)
    with Store.open(moved) as other:
        runner, address = await start_http(other, "127.0.0.1:0")
        try:
            after = await fetch(client, f"http://{address}/v1/images/alice/disk", "HEAD")
        finally:
            await runner.cleanup()
    assert after.headers["Cachepoint-Ref"] == "os/disk@2 user/alice/disk@1"
    assert after.headers["ETag"] != before.headers["ETag"]


def _copy_and_retag(source: Path, dest: Path) -> None:
    import shutil

    shutil.copytree(source, dest)
    with Store.open(dest, writable=True) as writable:
        writable.catalog.set_tag("os/disk@2", "production", "test")


# -- names that do not resolve ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/v1/versions/os%2Fnope@1/file", "os/nope"),
        ("/v1/versions/os%2Fdisk@9/file", "os/disk@9"),
        ("/v1/versions/os%2Fdisk:staging/file", "staging"),
        ("/v1/images/bob/disk", "bob"),
        ("/v1/versions/app%2Fmissing/files/etc/motd", "app/missing"),
    ],
)
async def test_an_unknown_ref_layer_or_image_is_a_json_404_naming_it(base_url, client, path, named):
    reply = await fetch(client, base_url + path)
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("application/json")
    assert named in reply.json()["error"]
    head = await fetch(client, base_url + path, "HEAD")
    assert head.status == 404 and head.body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/v1/versions/OS%2FDisk@1/file",
        "/v1/versions/os%2Fdisk@0/file",
        "/v1/versions/os%2Fdisk@x/file",
        "/v1/versions/os%2Fdisk:bad%20tag/file",
        "/v1/versions/%2Fos/file",
        "/v1/images/Bad%20Name/disk",
    ],
)
async def test_a_malformed_ref_or_image_name_is_a_json_400(base_url, client, path):
    reply = await fetch(client, base_url + path)
    assert reply.status == 400, reply.body
    assert reply.json()["type"] in ("InvalidRef", "InvalidLayerName")


async def test_a_ref_sent_with_a_raw_slash_is_a_400_saying_how_to_encode_it(base_url, client):
    reply = await fetch(client, base_url + "/v1/versions/os/disk@1/file")
    assert reply.status == 400 and "%2F" in reply.json()["error"]
    image = await fetch(client, base_url + "/v1/images/team/alice/disk")
    assert image.status == 400 and "/v1/images/team%2Falice/disk" in image.json()["error"]


async def test_unknown_routes_and_methods_answer_in_json_too(base_url, client):
    unknown = await fetch(client, base_url + "/v2/whatever")
    assert unknown.status == 404 and "error" in unknown.json()
    post = await fetch(client, base_url + "/v1/versions/os%2Fdisk@1/file", "POST")
    assert post.status == 405 and "GET" in post.headers["Allow"]


# -- health and the server itself ------------------------------------------------------------------


async def test_healthz_and_readyz_answer_while_the_store_is_open(base_url, client):
    health = await fetch(client, base_url + "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}
    ready = await fetch(client, base_url + "/readyz")
    assert ready.status == 200 and ready.json() == {"status": "ready"}


async def test_readyz_is_a_503_once_the_store_is_closed_while_healthz_stays_200(sources, client):
    other = Store.open(sources.root)
    runner, address = await start_http(other, "127.0.0.1:0")
    try:
        other.close()
        ready = await fetch(client, f"http://{address}/readyz")
        assert ready.status == 503 and "cannot be read" in ready.json()["error"]
        health = await fetch(client, f"http://{address}/healthz")
        assert health.status == 200
    finally:
        await runner.cleanup()


async def test_start_http_reports_the_port_it_bound_and_cleanup_releases_it(store, client):
    runner, address = await start_http(store, "127.0.0.1:0")
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    reply = await fetch(client, f"http://{address}/healthz")
    assert reply.status == 200
    await runner.cleanup()
    again, address2 = await start_http(store, address)  # the same port is free again
    try:
        assert address2 == address
    finally:
        await again.cleanup()


async def test_a_listen_address_without_a_port_is_refused(store):
    from cachepoint.errors import InvalidInput

    for bad in ("127.0.0.1", "127.0.0.1:http", ":80", "127.0.0.1:\u0668\u0660"):
        with pytest.raises(InvalidInput):
            await start_http(store, bad)
