"""The daemon's resident memory stays under its documented bound (README, docs/design.md "Memory")
while clients stall, and comes back when they go: NBD clients that stop in the middle of a 32 MiB
WRITE, FetchBlocks streams whose callers never read, HTTP downloads nobody reads. A normal client is
served meanwhile.

Each test runs a real `cachepoint serve` child with the read cache off and reads its VmRSS and VmHWM
from /proc. Every load loop is bounded; every socket and channel is closed on failure too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from cachepoint.disk.nbd import protocol as nbd
from cachepoint.rpc.channel import MAX_FETCH_IDS
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from tests import tls
from tests.conftest import cli_env, daemon, run_cli
from tests.fleet import BLOCK, random_image, stored_block_ids
from tests.test_nbd_protocol import connect, request, request_disc

MiB = 1 << 20
# The documented bound (README, "Memory"): with the read cache off, the daemon stays under 400 MB.
BOUND = 400 * 1000 * 1000
# After the clients go, RSS comes back to within this of what it was before they came: the
# allocator may keep some freed memory, but not the load's hundreds of MiB.
RETURN_TOLERANCE = 40 * MiB
RETURN_TIMEOUT = 60.0  # seconds for the daemon to notice closed clients and give memory back
SETTLE = 5.0  # seconds always waited after the clients go, before "after" is read
PUMP_SECONDS = 60.0  # the longest the stalled clients spend pushing their partial payloads
STALL_SAMPLES = 10  # RSS samples taken while the clients stall, a quarter second apart
WRITE = 32 * MiB  # the largest WRITE a client may send (nbd.MAX_PAYLOAD), as qemu does
SENT_PER_CLIENT = 28 * MiB  # what each stalled client tries to send of its payload
T = TypeVar("T")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"]


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def read_cache_off(store: Path) -> dict[str, str]:
    config = store.parent / "cachepoint.toml"
    config.write_text('read_cache = "0"\n')
    return dict(cli_env(store), CACHEPOINT_CONFIG=str(config))


def settled_rss(pid: int, target: int) -> int:
    """RSS once the daemon has had time to give memory back (it trims 2 s after a burst ends, see
    cachepoint/memory.py), and then once it is at most ``target``, or the lowest seen by
    RETURN_TIMEOUT (the caller asserts)."""
    time.sleep(SETTLE)
    deadline = time.monotonic() + RETURN_TIMEOUT
    lowest = memory(pid)[0]
    while lowest > target and time.monotonic() < deadline:
        time.sleep(0.5)
        lowest = min(lowest, memory(pid)[0])
    return lowest


def stable_rss(pid: int, samples: int = STALL_SAMPLES) -> int:
    """The highest RSS seen over a few samples (the load is in place; it should not be growing)."""
    peak = 0
    for _ in range(samples):
        peak = max(peak, memory(pid)[0])
        time.sleep(0.25)
    return peak


# -- NBD clients that stall mid-write ----------------------------------------------------------------


@contextlib.contextmanager
def stalled_writers(port: int, export: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections, each in transmission with a WRITE of 32 MiB announced and only part of
    its payload sent (as much as the server takes, up to SENT_PER_CLIENT). Closed on exit."""
    socks: list[socket.socket] = []
    try:
        for handle in range(count):
            sock, size, _ = connect(port, export)
            socks.append(sock)
            assert size >= WRITE
            sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, handle, 0, WRITE))
        pump(socks, SENT_PER_CLIENT)
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


def pump(socks: list[socket.socket], each: int) -> None:
    """Send up to ``each`` bytes of payload on every socket at once, until all are sent or none has
    moved for two seconds (the server stopped reading: backpressure), within PUMP_SECONDS."""
    chunk = os.urandom(MiB)
    left = {sock: each for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + PUMP_SECONDS
        last_progress = time.monotonic()
        while left and time.monotonic() < deadline and time.monotonic() - last_progress < 2.0:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    sent = sock.send(memoryview(chunk)[: min(len(chunk), left[sock])])
                except BlockingIOError:
                    continue
                left[sock] -= sent
                last_progress = time.monotonic()
                if not left[sock]:
                    selector.unregister(sock)
                    del left[sock]


def normal_read_works(port: int, export: str, expected: bytes) -> bool:
    sock, _, _ = connect(port, export)
    with sock:
        sock.settimeout(30.0)
        error, payload = request(sock, nbd.CMD_READ, 0, len(expected))
        request_disc(sock)
    return error == 0 and payload == expected


def test_nbd_clients_stalled_mid_write_keep_the_daemon_under_its_memory_bound(tmp_path):
    store = tmp_path / "store"
    image = tmp_path / "os.img"
    with open(image, "wb") as f:  # 64 MiB: room for a 32 MiB write; mostly holes, so quick to ingest
        f.write(os.urandom(4 * MiB))
        f.truncate(64 * MiB)
    run_cli(store, "ingest", "os/base", image)
    run_cli(store, "image", "create", "desk", "os/base")
    with daemon(store, "--nbd", "127.0.0.1:0", env=read_cache_off(store)) as ready:
        pid = int(ready["pid"])  # type: ignore[call-overload]
        port = int(str(ready["nbd"][0]).rpartition(":")[2])  # type: ignore[index]
        run_cli(store, "attach", "desk", "--user", "alice", "--json")
        export = "alice/desk"
        # Warm up as a normal client would: write a few MiB, read them back.
        written = os.urandom(4 * MiB)
        sock, _, _ = connect(port, export)
        with sock:
            assert request(sock, nbd.CMD_WRITE, 0, data=written)[0] == 0
            assert request(sock, nbd.CMD_READ, 0, len(written)) == (0, written)
            request_disc(sock)
        baseline = stable_rss(pid, 4)
        report = [f"baseline {mb(baseline)}"]
        for count in (20, 60):
            with stalled_writers(port, export, count):
                during = stable_rss(pid)
                assert normal_read_works(port, export, written[:BLOCK])
                during = max(during, memory(pid)[0])
            after = settled_rss(pid, baseline + RETURN_TOLERANCE)
            report.append(f"{count} stalled writers: {mb(during)}, after they close {mb(after)}")
            print(report[-1])
            assert during < BOUND, "; ".join(report)
            assert after <= baseline + RETURN_TOLERANCE, "; ".join(report)
        peak = memory(pid)[1]
        report.append(f"VmHWM {mb(peak)}")
        print("; ".join(report))
        assert peak < BOUND, "; ".join(report)
        assert normal_read_works(port, export, written[:BLOCK])


# -- FetchBlocks streams nobody reads ------------------------------------------------------------


VERSION = "os/base@1"  # what the blocks are asked for (with TLS, only a version's blocks are served)
LOAD_SETTLE = 3.0  # seconds for 200 calls to reach the daemon and stall there (a bound, not a speed)


def normal_fetch(address: str, ids: list[bytes]) -> int:
    """A peer that reads what it asked for: the number of blocks that came."""
    with tls.channel(address) as ch:
        stream = blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(
            blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=VERSION), timeout=60
        )
        return sum(len(batch.blocks) for batch in stream)


async def while_unread(address: str, ids: list[bytes], count: int, measure: Callable[[], T]) -> T:
    """Start ``count`` FetchBlocks calls for ``ids`` that are never read, each on its own connection
    with a small receive window (a slow or stuck peer), then run ``measure`` (in a thread, while
    this loop keeps the calls alive); everything is cancelled and closed on the way out."""
    options = [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", 64 * MiB),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [tls.aio_channel(address, options=options) for _ in range(count)]
    calls = []
    try:
        request = blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=VERSION)
        for ch in channels:
            calls.append(blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(request, timeout=120))
        await asyncio.sleep(LOAD_SETTLE)
        return await asyncio.to_thread(measure)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """A store holding 320 MiB of incompressible blocks (batches and chunks as large as they get),
    and the ids of the first MAX_FETCH_IDS of them."""
    root = tmp_path_factory.mktemp("big")
    image = root / "os.img"
    random_image(image, 320 * MiB, seed=7)
    run_cli(root / "store", "ingest", "os/base", image)
    ids = sorted(stored_block_ids(image))[:MAX_FETCH_IDS]
    image.unlink()
    return root / "store", ids


@pytest.mark.skipif(not ipv6_loopback(), reason="needs ::1 (the normal peer's address)")
def test_fetch_blocks_streams_that_are_never_read_keep_the_daemon_under_its_memory_bound(big_store):
    store, ids = big_store
    # On localhost the daemon listens on 127.0.0.1 and ::1: the stuck peer comes from one, the
    # normal peer from the other (a peer is an address: streams are capped per peer).
    with daemon(store, "--listen", "localhost:0", env=read_cache_off(store)) as ready:
        pid = int(ready["pid"])  # type: ignore[call-overload]
        port = str(ready["listening"]).rpartition(":")[2]
        stuck, normal = f"127.0.0.1:{port}", f"[::1]:{port}"
        assert normal_fetch(normal, ids[:256]) == 256  # warm: store caches, threads, connections
        baseline = stable_rss(pid, 4)

        def measure() -> tuple[int, int]:
            during = stable_rss(pid)
            served = normal_fetch(normal, ids[:64])  # a normal peer is served meanwhile
            return max(during, memory(pid)[0]), served

        during, served = asyncio.run(while_unread(stuck, ids, 200, measure))
        after = settled_rss(pid, baseline + RETURN_TOLERANCE)
        peak = memory(pid)[1]
        report = (
            f"baseline {mb(baseline)}; 200 unread streams {mb(during)}; after {mb(after)}; VmHWM {mb(peak)}"
        )
        print(report)
        assert served == 64, report
        assert during < BOUND and peak < BOUND, report
        assert after <= baseline + RETURN_TOLERANCE, report
        assert normal_fetch(normal, ids[:64]) == 64


# -- HTTP downloads nobody reads -------------------------------------------------------------------

HTTP_FILE = "/v1/versions/os%2Fbase@1/file"


def http_head(host: str, port: int, source: str) -> tuple[int, bytes]:
    """A normal client from ``source``: the first 64 KiB of the file, with Range."""
    conn = http.client.HTTPConnection(host, port, timeout=60, source_address=(source, 0))
    try:
        conn.request("GET", HTTP_FILE, headers={"Range": "bytes=0-65535"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_http_downloads_that_are_never_read_keep_the_daemon_under_its_memory_bound(big_store):
    store, _ = big_store
    with daemon(store, "--http", "127.0.0.1:0", env=read_cache_off(store)) as ready:
        pid = int(ready["pid"])  # type: ignore[call-overload]
        host, _, port_text = str(ready["http"]).rpartition(":")
        port = int(port_text)
        status, head = http_head(host, port, "127.0.0.1")  # warm, and what a normal client gets
        assert status == 206 and len(head) == 65536
        baseline = stable_rss(pid, 4)
        socks: list[socket.socket] = []
        try:
            for _ in range(100):  # whole-file GETs whose responses are never read
                sock = socket.create_connection((host, port), timeout=60)
                socks.append(sock)
                sock.sendall(f"GET {HTTP_FILE} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            time.sleep(LOAD_SETTLE)
            during = stable_rss(pid)
            # Another client address (127.0.0.2 is loopback too) is served meanwhile.
            normal = http_head(host, port, "127.0.0.2")
            during = max(during, memory(pid)[0])
        finally:
            for sock in socks:
                sock.close()
        after = settled_rss(pid, baseline + RETURN_TOLERANCE)
        peak = memory(pid)[1]
        report = (
            f"baseline {mb(baseline)}; 100 unread downloads {mb(during)}; after {mb(after)}; VmHWM {mb(peak)}"
        )
        print(report)
        assert normal == (206, head), report
        assert during < BOUND and peak < BOUND, report
        assert after <= baseline + RETURN_TOLERANCE, report
