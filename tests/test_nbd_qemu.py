"""Composite disks served over NBD to real clients: qemu-img, qemu-io, and an ext4 file system.

The OS layer is an ext4 image made here with mkfs.ext4 from a generated tree; a modified copy
(debugfs) is written onto the user's export, and the user's layer must grow only by the blocks
that really differ. The server runs in this process (on a background event loop) and, in one test,
in a child process that is stopped and whose store is reopened afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachepoint.disk.attach import open_disk
from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.nbd import protocol as nbd
from cachepoint.disk.snapshot import snapshot
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking, LayerKind
from cachepoint.store.store import Store
from tests.conftest import REPO
from tests.test_nbd_protocol import ServerThread, connect, recv_exactly, request, still_serves

TOOLS = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}
_missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"needs {', '.join(_missing)} (apt-get install; `make test` installs them)"
)

BS = 65536  # the layers' block size (ingest's default)
IMAGE_SIZE = "32M"
TIMEOUT = 120


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_tree(root: Path, seed: int) -> None:
    """A small OS-like tree: config text, a few binaries of random bytes, empty dirs, a symlink."""
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "home" / "alice").mkdir(parents=True)
    (root / "var" / "empty").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"host-{seed}\n")
    (root / "etc" / "motd").write_text("welcome\n" * 200)
    for i, size in enumerate((300_000, 1_200_000, 5_000, 2_500_000)):
        (root / "usr" / "bin" / f"tool{i}").write_bytes(os.urandom(size))
    (root / "home" / "alice" / "notes.txt").write_text("remember the milk\n" * 1000)
    os.symlink("../usr/bin/tool0", root / "etc" / "link")


@pytest.fixture(scope="module")
def ext4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ext4")
    make_tree(work / "tree", seed=1)
    image = work / "img.raw"
    run("mkfs.ext4", "-q", "-d", work / "tree", "-F", image, IMAGE_SIZE)
    return image


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store", writable=True, create=True) as opened:
        yield opened


@pytest.fixture
def os_ref(store: Store, ext4: Path) -> str:
    result = ingest(store, ext4, IngestOptions("os/ext4", kind=LayerKind.OS, message="base image"))
    assert result.version is not None
    return result.version.ref


@pytest.fixture
def serve() -> Iterator[object]:
    started: list[tuple[ServerThread, list[CompositeDisk]]] = []

    def start(exports: dict[str, CompositeDisk], **kwargs: object) -> ServerThread:
        server = ServerThread(exports, **kwargs)  # type: ignore[arg-type]
        started.append((server, list(exports.values())))
        return server

    yield start
    for server, disks in started:
        server.stop()
        for disk in disks:
            disk.close()


def differing_blocks(a: Path, b: Path) -> set[int]:
    with a.open("rb") as fa, b.open("rb") as fb:
        found = set()
        index = 0
        while True:
            x, y = fa.read(BS), fb.read(BS)
            if not x and not y:
                return found
            if x != y:
                found.add(index)
            index += 1


def modify_with_debugfs(source: Path, dest: Path, tmp_path: Path) -> None:
    """Add, replace and remove files in a copy of the image, as a user's session would."""
    shutil.copyfile(source, dest)
    added = tmp_path / "added.bin"
    added.write_bytes(os.urandom(700_000))
    edited = tmp_path / "hostname"
    edited.write_text("renamed-host\n")
    commands = tmp_path / "debugfs.cmds"
    commands.write_text(
        "\n".join(
            [
                f"write {added} /home/alice/download.bin",
                "rm /etc/hostname",
                f"write {edited} /etc/hostname",
                "rm /usr/bin/tool2",
                "mkdir /home/alice/projects",
                "",
            ]
        )
    )
    run("debugfs", "-w", "-f", commands, dest)
    run("e2fsck", "-fn", dest)  # the modified copy is itself a clean file system


def test_qemu_img_compare_finds_the_served_os_layer_identical_to_the_ext4_image(
    store, os_ref, ext4, serve, tmp_path
):
    path = tmp_path / "nbd.sock"
    server = serve({"os": open_disk(store, [os_ref])}, unix_path=str(path))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, server.url("os"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, f"nbd+unix:///os?socket={path}")
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.url("os"), copy)
    run("e2fsck", "-fn", copy)
    refused = run("qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4096", server.url("os"), check=False)
    # qemu sees NBD_FLAG_READ_ONLY and will not open the export for writing at all.
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


def test_qemu_io_writes_reads_zeroes_and_discards_on_a_writable_export(store, os_ref, ext4, serve):
    disk = open_disk(store, [os_ref], user_layer="user/alice/ext4")
    server = serve({"alice": disk})
    script = [
        "write -P 0xab 4096 8192",
        "read -P 0xab 4096 8192",
        "write -P 0x11 1000 3000",
        "read -P 0x11 1000 3000",
        "read -P 0xab 4096 8192",  # the unaligned write kept the bytes around it
        "write -z 1048576 200000",
        "read -P 0 1048576 200000",
        "discard 4194304 131072",
        "read -P 0 4194304 131072",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for command in script:
        args += ["-c", command]
    proc = run(*args, server.url("alice"))
    assert "Pattern verification failed" not in proc.stdout, proc.stdout
    original = ext4.read_bytes()
    expected = bytearray(original)
    expected[4096 : 4096 + 8192] = b"\xab" * 8192
    expected[1000:4000] = b"\x11" * 3000
    expected[1048576 : 1048576 + 200000] = bytes(200000)
    expected[4194304 : 4194304 + 131072] = bytes(131072)
    assert disk.read_sync(0, disk.size) == bytes(expected)
    assert sorted(disk.working.entries) == sorted(differing_blocks_of(original, bytes(expected)))
    assert open_disk(store, [os_ref]).read_sync(0, len(original)) == original  # the OS layer is untouched


def differing_blocks_of(a: bytes, b: bytes) -> set[int]:
    return {i for i in range(0, -(-len(a) // BS)) if a[i * BS : (i + 1) * BS] != b[i * BS : (i + 1) * BS]}


@pytest.mark.parametrize("chunking", [Chunking.FIXED, Chunking.CONTENT], ids=["fixed", "content"])
def test_a_modified_file_system_written_onto_the_user_export_grows_the_user_layer_by_its_changes_only(
    store, ext4, serve, tmp_path, chunking
):
    # Over a content-chunked OS layer the user's writes still go on the 64 KiB grid, and a block the
    # layer holds only in pieces is compared by its bytes (tests/test_disk_pieces.py).
    options = IngestOptions("os/ext4", kind=LayerKind.OS, message="base image", chunking=chunking)
    os_ref = ingest(store, ext4, options).version.ref
    modified = tmp_path / "modified.raw"
    modify_with_debugfs(ext4, modified, tmp_path)
    changed = differing_blocks(ext4, modified)
    assert 0 < len(changed) < 32 * 1024 * 1024 // BS // 4

    disk = open_disk(store, [os_ref], user_layer="user/alice/ext4")
    server = serve({"alice": disk})
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", modified, server.url("alice"))
    assert set(disk.working.entries) == changed
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.url("alice"), out)
    run("e2fsck", "-fn", out)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", modified, out)

    os_before = store.catalog.resolve(os_ref)
    info = snapshot(store, disk, "user/alice/ext4", "after debugfs")
    assert info.ref == "user/alice/ext4@1" and disk.working.entries == {}
    user_blocks = store.catalog.manifest(info.manifest_digest).entries[0].stored_digests()
    assert len(user_blocks) == len(changed)
    assert store.catalog.resolve(os_ref) == os_before and store.catalog.layer("os/ext4").latest == 1
    # Still attached and writable after the snapshot.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", server.url("alice"))
    assert disk.read_sync(0, 512) == b"\x5a" * 512

    reopened = CompositeDisk(
        store,
        [(v, store.catalog.manifest(v.manifest_digest)) for v in (os_before, info)],
    )
    again = serve({"user": reopened, "os": open_disk(store, [os_ref])})
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", modified, again.url("user"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, again.url("os"))


def test_misbehaving_clients_leave_a_served_composite_disk_up(store, os_ref, ext4, serve):
    server = serve(
        {"os": open_disk(store, [os_ref]), "alice": open_disk(store, [os_ref], user_layer="user/alice/ext4")}
    )
    for garbage in (b"\xff" * 40, struct.pack(">I", 1) + b"\x00" * 16):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            recv_exactly(sock, 18)
            sock.sendall(garbage)
    sock, size, _ = connect(server.port, "os")
    with sock:
        assert request(sock, nbd.CMD_READ, size - 10, 20) == (nbd.EINVAL, b"")
        assert request(sock, nbd.CMD_WRITE, 0, data=b"\x01" * 512) == (nbd.EPERM, b"")
    sock, _, _ = connect(server.port, "alice")
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 1 << 20) + b"\xee" * 4096)
    sock.close()  # gone in the middle of its write
    assert still_serves(server.port, "alice")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, server.url("alice"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, server.url("os"))


RUNNER = """
import asyncio, json, sys

from cachepoint.disk.attach import open_disk
from cachepoint.disk.nbd import start_nbd
from cachepoint.store.store import Store


async def main(store_dir: str, user: str, refs: list[str]) -> None:
    with Store.open(store_dir, writable=True) as store:
        disk = open_disk(store, refs, user_layer=user)
        server = await start_nbd({"disk": disk}.get, lambda: ["disk"], tcp="127.0.0.1:0")
        print(json.dumps(server.addresses), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # serve until the test closes our stdin
        await server.close()
        disk.close()


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""


def test_a_server_in_a_child_process_keeps_flushed_writes_in_the_store_after_it_stops(
    store, os_ref, ext4, tmp_path
):
    store_dir = store.root
    store.close()  # the child is the store's one writer
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    child = subprocess.Popen(
        [sys.executable, str(runner), str(store_dir), "user/alice/ext4", os_ref],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        addresses = json.loads(child.stdout.readline())
        url = f"nbd://{addresses[0]}/disk"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ext4, url)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x7e 65536 70000", "-c", "flush", url)
        child.stdin.close()
        assert child.wait(TIMEOUT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(TIMEOUT)
    with Store.open(store_dir, writable=True) as again:
        disk = open_disk(again, [os_ref], user_layer="user/alice/ext4")
        try:
            assert disk.read_sync(65536, 70000) == b"\x7e" * 70000
            assert sorted(disk.working.entries) == [1, 2]
        finally:
            disk.close()
