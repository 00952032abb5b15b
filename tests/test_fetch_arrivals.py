"""A FetchBlocks call held open for the blocks a node's shared pull is still fetching (wait_ms,
cachepoint/replication/arrivals.py): each block comes in the same call as soon as the pull stores
it; ids the pull is not fetching are not waited for; a held call gives its stream slot up to a caller
waiting for one; a pull that ends releases the calls waiting on it.

A real grpc.aio server (as the daemon builds it, with TLS when the harness has it on) over a real
store on an event loop in a background thread; the callers are real grpc clients on loopback. The
test plays the pull: it stores blocks and tells the BlockArrivals, as the fetcher does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachepoint.replication.arrivals import BlockArrivals
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.serving import Server
from cachepoint.slots import SlotLimits
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc
from tests import tls
from tests.conftest import run_cli
from tests.fleet import random_image, stored_block_ids
from tests.serving_loop import serving_loop
from tests.test_rpc_limits import VERSION, node_credentials, wait_for

MiB = 1 << 20
TIMEOUT = 30.0  # every call and wait is bounded by this
HOLD_MS = 60_000  # longer than any call here may last: a call that ends did not wait it out
SERVICE = "cachepoint.v1.BlockExchange"
LIMITS = SlotLimits(per_server=16, per_peer=8, wait=5.0, stall=30.0)


@dataclass
class Node:
    """A node's peer port whose store is filled by the test, as a pull would fill it."""

    address: str
    store: Store
    arrivals: BlockArrivals
    service: BlockExchangeService
    loop: asyncio.AbstractEventLoop
    values: dict[bytes, bytes]  # every block of the version, as stored: what the "pull" lands

    def on_loop(self, work: Any) -> Any:
        async def run() -> Any:
            return work()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(TIMEOUT)

    def land(self, ids: list[bytes]) -> None:
        """What the fetcher does with a verified batch: write it, then tell the arrivals."""
        self.store.blocks.put_many([(d, self.values[d]) for d in ids], True)
        self.on_loop(lambda: self.arrivals.stored(ids))

    def running(self) -> int:
        return int(self.on_loop(lambda: self.service.fetches.running))


@dataclass
class Call:
    """A FetchBlocks call read on a thread of its own: the ids of each batch, as it came."""

    batches: list[list[bytes]] = field(default_factory=list)
    done: Future[float] = field(default_factory=Future)  # how long the call lasted

    def blocks(self) -> list[bytes]:
        return [digest for batch in self.batches for digest in batch]


def start_call(address: str, ids: list[bytes], wait_ms: int) -> Call:
    call = Call()

    def read() -> None:
        started = time.monotonic()
        try:
            with tls.channel(address) as ch:
                request = blocks_pb2.FetchBlocksRequest(ids=b"".join(ids), version=VERSION, wait_ms=wait_ms)
                for batch in blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(request, timeout=TIMEOUT):
                    call.batches.append([block.id for block in batch.blocks])
            call.done.set_result(time.monotonic() - started)
        except grpc.RpcError as err:
            call.done.set_exception(err)

    threading.Thread(target=read, name="fetch-call", daemon=True).start()
    return call


@pytest.fixture(scope="module")
def version_values(tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, bytes]:
    root = tmp_path_factory.mktemp("arrivals")
    image = root / "os.img"
    random_image(image, 4 * MiB, seed=23)  # 64 incompressible blocks
    run_cli(root / "origin", "ingest", "os/base", image)
    ids = sorted(stored_block_ids(image))
    with Store.open(root / "origin") as origin:
        values = {digest: origin.blocks.raw(digest) for digest in ids}
    assert all(values.values())
    return values  # type: ignore[return-value]


@pytest.fixture
def node(tmp_path: Path, version_values: dict[bytes, bytes]) -> Iterator[Any]:
    """start(limits) -> Node: an empty node store served as the daemon serves it, with arrivals."""
    store = Store.open(tmp_path / "node", writable=True, create=True)
    trust, credentials = node_credentials(tmp_path)
    with serving_loop() as (loop, servers):

        def start(limits: SlotLimits = LIMITS) -> Node:
            arrivals = BlockArrivals()
            service = BlockExchangeService(
                store, ServeCounters(), accepts_pushes=False, fetch_limits=limits, arrivals=arrivals
            )

            async def begin() -> str:
                server = Server("127.0.0.1:0", SERVICE, node=True, credentials=credentials)
                server.add(lambda s: blocks_pb2_grpc.add_BlockExchangeServicer_to_server(service, s))
                servers.append(server)
                return await server.start()

            address = asyncio.run_coroutine_threadsafe(begin(), loop).result(TIMEOUT)
            if trust is not None:
                tls.serve(address, trust, peer=True)
            return Node(address, store, arrivals, service, loop, version_values)

        try:
            yield start
        finally:
            store.close()


def test_a_held_call_streams_each_block_as_the_pull_stores_it(node: Any) -> None:
    n = node()
    ids = sorted(n.values)[:32]
    n.on_loop(lambda: n.arrivals.expect(ids))  # the pull has planned them; none is stored yet
    n.land(ids[:4])  # ... but these, which the call gets at once
    call = start_call(n.address, ids, HOLD_MS)
    wait_for("the first batch", lambda: call.batches)
    assert call.blocks() == ids[:4] and n.running() == 1, call.batches  # answered, still held
    n.land(ids[4:20])
    wait_for("the landed blocks", lambda: len(call.blocks()) == 20)
    assert not call.done.done()
    n.land(ids[20:])
    lasted = call.done.result(TIMEOUT)  # every id came: the call ends, long before HOLD_MS
    assert sorted(call.blocks()) == ids and len(call.blocks()) == 32, call.batches
    assert len(call.batches) >= 3 and lasted < HOLD_MS / 1000


def test_ids_the_pull_is_not_fetching_are_not_waited_for(node: Any) -> None:
    n = node()
    ids = sorted(n.values)
    n.land(ids[:8])
    n.on_loop(lambda: n.arrivals.expect(ids[8:16]))
    n.on_loop(lambda: n.arrivals.forget(ids[8:16]))  # that pull ended without them
    call = start_call(n.address, ids[:24], HOLD_MS)
    call.done.result(TIMEOUT)  # with nothing coming, the call ends at once
    assert call.blocks() == ids[:8]


def test_a_pull_that_ends_releases_the_calls_held_for_it(node: Any) -> None:
    n = node()
    ids = sorted(n.values)[:16]
    n.on_loop(lambda: n.arrivals.expect(ids))
    call = start_call(n.address, ids, HOLD_MS)
    wait_for("the call to be held", lambda: n.running() == 1)
    n.land(ids[:5])
    n.on_loop(lambda: n.arrivals.forget(ids[5:]))  # the pull failed: the rest is not coming from it
    call.done.result(TIMEOUT)
    assert call.blocks() == ids[:5]


def test_a_held_call_gives_its_stream_slot_to_a_caller_waiting_for_one(node: Any) -> None:
    n = node(SlotLimits(per_server=1, per_peer=1, wait=10.0, stall=30.0))
    ids = sorted(n.values)
    n.land(ids[32:40])
    n.on_loop(lambda: n.arrivals.expect(ids[:16]))
    held = start_call(n.address, ids[:16], HOLD_MS)
    wait_for("the call to be held", lambda: n.running() == 1)
    other = start_call(n.address, ids[32:40], 0)  # over the limit of one: it waits for the slot
    other.done.result(TIMEOUT)
    assert other.blocks() == ids[32:40]
    held.done.result(TIMEOUT)  # it ended to let the other in, with nothing (none landed)
    assert held.blocks() == []
