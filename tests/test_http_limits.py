"""HTTP downloads under limits (cachepoint/http/app.py, cachepoint/slots.py): a client that reads
nothing loses its connection after the stall time, and a client address over its share of downloads
is told 503 (after a short wait) while another address is served.

The server is the real aiohttp app over a real store, on an event loop in a background thread (as
in the daemon); the clients are plain sockets and http.client on loopback (127.0.0.2 is a second
client address there).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cachepoint.http.app import RESPONSES, start_http
from cachepoint.slots import SlotLimits, Slots
from cachepoint.store.store import Store
from tests.conftest import run_cli
from tests.fleet import random_image

MiB = 1 << 20
TIMEOUT = 30.0  # every wait is bounded by this
FILE = "/v1/versions/os%2Fbase@1/file"


@dataclass
class Served:
    host: str
    port: int
    slots: Slots
    loop: asyncio.AbstractEventLoop

    def running(self) -> int:
        async def count() -> int:
            return self.slots.running

        return int(asyncio.run_coroutine_threadsafe(count(), self.loop).result(TIMEOUT))


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("http-limits")
    image = root / "os.img"
    random_image(image, 48 * MiB, seed=21)  # far more than socket buffers and read-ahead hold
    run_cli(root / "store", "ingest", "os/base", image)
    with open(image, "rb") as f:
        head = f.read(65536)
    return root / "store", head


@pytest.fixture
def serve(image_store: tuple[Path, bytes]) -> Iterator[Any]:
    store = Store.open(image_store[0], writable=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-test-loop", daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    def call(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(TIMEOUT)

    def start(limits: SlotLimits) -> Served:
        runner, address = call(start_http(store, "127.0.0.1:0", limits))
        runners.append(runner)
        host, _, port = address.rpartition(":")
        return Served(host, int(port), runner.app[RESPONSES], loop)

    try:
        yield start
    finally:
        for runner in runners:
            call(runner.cleanup())
        call(_cancel_the_rest())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
        store.close()


async def _cancel_the_rest() -> None:
    """Connections aiohttp still lingers on (reading a body to throw away) end with the loop."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


@contextlib.contextmanager
def unread_downloads(served: Served, count: int) -> Iterator[list[socket.socket]]:
    """``count`` GETs of the whole file, whose responses are never read; closed on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((served.host, served.port), timeout=TIMEOUT)
            socks.append(sock)
            sock.sendall(f"GET {FILE} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        yield socks
    finally:
        for sock in socks:
            sock.close()


def get_head(served: Served, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """A normal client from ``source``: the first 64 KiB of the file, with Range."""
    conn = http.client.HTTPConnection(served.host, served.port, timeout=TIMEOUT, source_address=(source, 0))
    try:
        conn.request("GET", FILE, headers={"Range": "bytes=0-65535"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for(what: str, probe: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def closed_by_server(sock: socket.socket) -> bool:
    """Read what the server sent until it ends the connection (bounded by TIMEOUT)."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_download_nobody_reads_is_cut_off_after_the_stall_time(serve, image_store) -> None:
    served = serve(SlotLimits(per_server=4, per_peer=4, wait=1.0, stall=0.5))
    with unread_downloads(served, 1) as socks:
        wait_for("the download to start", lambda: served.running() == 1)
        wait_for("the stalled download to end", lambda: served.running() == 0)  # the client is still there
        assert closed_by_server(socks[0])
    assert get_head(served) == (206, image_store[1])


def test_a_client_over_its_share_of_downloads_gets_503_while_another_client_is_served(
    serve, image_store
) -> None:
    served = serve(SlotLimits(per_server=4, per_peer=2, wait=1.0, stall=TIMEOUT))
    with unread_downloads(served, 2):
        wait_for("two downloads of one client", lambda: served.running() == 2)
        status, body = get_head(served)  # waits its turn, which does not come
        assert status == 503
        error = json.loads(body)
        assert (
            error["type"] == "TooManyStreams"
            and "127.0.0.1" in error["error"]
            and "per peer" in error["error"]
        )
        assert get_head(served, source="127.0.0.2") == (206, image_store[1])  # another client address
    wait_for("the downloads to end", lambda: served.running() == 0)
