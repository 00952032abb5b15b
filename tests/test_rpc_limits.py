"""Bounds on what a gRPC server holds for its callers (cachepoint/rpc/streams.py, channel.py): a
FetchBlocks caller that reads nothing is cut off, streams are capped per peer and per server (over a
cap a caller waits a little, then is told RESOURCE_EXHAUSTED naming the limit), and a daemon refuses
messages larger than any request it takes.

The servers are real grpc.aio servers over a real store, on an event loop in a background thread
(as in the daemon); the callers are real grpc clients on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachepoint.rpc import channel
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.serving import Server
from cachepoint.rpc.streams import peer_host
from cachepoint.slots import SlotLimits
from cachepoint.store.store import Store
from cachepoint.trust.identity import Identity
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from tests import tls
from tests.conftest import run_cli
from tests.fleet import random_image, stored_block_ids
from tests.serving_loop import serving_loop

MiB = 1 << 20
TIMEOUT = 30.0  # every call and wait is bounded by this
VERSION = "os/base@1"


@dataclass
class Served:
    address: str
    service: BlockExchangeService
    ids: list[bytes]
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def running(self) -> int:
        async def count() -> int:
            return self.service.fetches.running

        return int(self.call(count()))


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("rpc-limits")
    image = root / "os.img"
    random_image(image, 16 * MiB, seed=11)  # 256 incompressible blocks: 16 batches of 1 MiB
    run_cli(root / "store", "ingest", "os/base", image)
    return root / "store", sorted(stored_block_ids(image))


def node_credentials(root: Path) -> tuple[tls.Trust | None, grpc.ServerCredentials | None]:
    """With the harness's TLS on, a node identity of a CA of its own, served as the daemon serves it."""
    if not tls.ENABLED:
        return None, None
    trust = tls.Trust.for_data(root / "ca-data")
    return trust, Identity.load(trust.node(root / "node", "node", "")).server_credentials()


@pytest.fixture
def serve(blocks_dir: tuple[Path, list[bytes]]) -> Iterator[Any]:
    """start(limits) -> Served: a node's gRPC server (as the daemon builds it) with BlockExchange."""
    store = Store.open(blocks_dir[0], writable=False)
    trust, credentials = node_credentials(blocks_dir[0].parent)
    with serving_loop() as (loop, servers):

        def start(limits: SlotLimits, listen: str = "127.0.0.1:0") -> Served:
            service = BlockExchangeService(store, ServeCounters(), accepts_pushes=False, fetch_limits=limits)

            async def begin() -> str:
                server = Server(listen, "cachepoint.v1.BlockExchange", node=True, credentials=credentials)
                server.add(lambda s: blocks_pb2_grpc.add_BlockExchangeServicer_to_server(service, s))
                servers.append(server)
                return await server.start()

            served = Served("", service, blocks_dir[1], loop)
            served.address = served.call(begin())
            if trust is not None:
                tls.serve(served.address, trust, peer=True)
            return served

        try:
            yield start
        finally:
            store.close()


def fetch(address: str, ids: list[bytes]) -> int:
    """A normal caller: every block it asked for, read to the end; returns how many came."""
    with tls.channel(address) as ch:
        stream = blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(
            blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=VERSION), timeout=TIMEOUT
        )
        return sum(len(batch.blocks) for batch in stream)


@contextlib.contextmanager
def unread_fetches(address: str, ids: list[bytes], count: int) -> Iterator[list[Any]]:
    """``count`` FetchBlocks calls, each on its own connection with a small receive window, started
    and never read; cancelled and closed on exit."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    channels = [tls.channel(address, options=options) for _ in range(count)]
    calls = []
    try:
        request = blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=VERSION)
        for ch in channels:
            calls.append(blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(request, timeout=TIMEOUT))
        yield calls
    finally:
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()


def wait_for(what: str, probe: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def outcome(call: Any) -> grpc.StatusCode:
    """How a call ended, once its messages are read (bounded by its own deadline)."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_peer_host_is_the_address_without_the_port() -> None:
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "::1"
    assert peer_host("unix:/run/cachepoint.sock") == "unix"


def test_a_fetch_whose_caller_reads_nothing_is_cancelled_after_the_stall_time_and_frees_its_slot(
    serve,
) -> None:
    served = serve(SlotLimits(per_server=4, per_peer=4, wait=1.0, stall=0.5))
    with unread_fetches(served.address, served.ids, 1):
        wait_for("the stream to start", lambda: served.running() == 1)
        wait_for("the stalled stream to be cancelled", lambda: served.running() == 0)  # the caller stays
        assert served.service.counters.blocks_served < len(served.ids)
    assert fetch(served.address, served.ids) == len(served.ids)


def test_a_peer_over_its_share_of_streams_waits_then_is_refused_while_another_peer_is_served(serve) -> None:
    # Listening on localhost: IPv4 and IPv6 loopback are two peers of one server.
    served = serve(SlotLimits(per_server=4, per_peer=2, wait=1.0, stall=TIMEOUT), listen="localhost:0")
    port = served.address.rpartition(":")[2]
    with unread_fetches(f"127.0.0.1:{port}", served.ids, 2):
        wait_for("two streams of one peer", lambda: served.running() == 2)
        with unread_fetches(f"127.0.0.1:{port}", served.ids, 3) as over:
            # Two wait their turn (and are refused when it does not come); the third is refused at once.
            codes = [outcome(call) for call in over]
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
            details = over[0].details()
            assert "FetchBlocks" in details and "127.0.0.1" in details and "per peer" in details
        assert fetch(f"[::1]:{port}", served.ids) == len(served.ids)  # another peer is served meanwhile
        wait_for("the other peer's stream to end", lambda: served.running() == 2)
    wait_for("the cancelled streams to end", lambda: served.running() == 0)


def test_a_fetch_over_the_limit_goes_ahead_once_a_slot_frees(serve) -> None:
    served = serve(SlotLimits(per_server=1, per_peer=1, wait=TIMEOUT, stall=TIMEOUT))
    got: list[int] = []
    with unread_fetches(served.address, served.ids, 1):
        wait_for("the first stream", lambda: served.running() == 1)
        waiting = threading.Thread(target=lambda: got.append(fetch(served.address, served.ids[:8])))
        waiting.start()
        time.sleep(0.3)
        assert not got  # still waiting for the slot
    waiting.join(TIMEOUT)
    assert got == [8]


def test_a_daemon_refuses_a_message_larger_than_any_request_it_takes(serve) -> None:
    served = serve(channel.NODE_FETCH_LIMITS)
    with tls.channel(served.address) as ch:
        request = blocks_pb2.HasBlocksRequest(ids=bytes(channel.NODE_MAX_RECEIVE + MiB))
        with pytest.raises(grpc.RpcError) as caught:
            blocks_pb2_grpc.BlockExchangeStub(ch).HasBlocks(request, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "Received message larger than max" in caught.value.details()  # type: ignore[attr-defined]
