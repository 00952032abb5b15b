"""Input is bounded before it costs memory or disk: a pushed block larger than the largest block size
(or a zstd frame that declares more) is refused, a commit whose manifest names a block larger than
its block size is refused, a fetched block larger than its layer's block size is refused and its
sender dropped; malformed request bytes get INVALID_ARGUMENT and one log line on every server; block
streams are capped per peer, and the fetcher waits out a busy source instead of dropping it.

A real coordinator and a real cachepoint daemon (child processes, loopback), started once for the
module; the fetched-block cases use an in-process server that sends what no honest peer sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachepoint.blocks import CODEC_LZ4, CODEC_RAW, CODEC_ZSTD, MAX_STORED_SIZE, encode_fast
from cachepoint.errors import PullIncomplete
from cachepoint.model import EntryType, FileEntry, Manifest
from cachepoint.replication.fetcher import Fetcher
from cachepoint.replication.sources import Source, SourceClass
from cachepoint.rpc.guards import BUSY_KEY, PEER_STREAMS
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2, catalog_pb2_grpc
from cachepoint.wire import manifest_digest, manifest_to_bytes
from tests import tls
from tests.conftest import coordinator_catalog
from tests.fleet import LAYER, Child, Fleet, Node, cachepoint_cli, publish, random_image, wait_until

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MiB = 1024 * 1024
KiB = 1024
DEADLINE = 30.0
GARBAGE = b"\xff\xff\xff\xff\x0f not a protobuf message"  # field 0x1fffffff of wire type 7: no such type


@dataclass
class Servers:
    fleet: Fleet
    coordinator: Child
    cachepoint: Node
    version_ids: list[bytes]  # the block ids of the published version (16 MiB of 64 KiB blocks)
    root: Path

    def assert_serving(self) -> None:
        for child in (self.coordinator, self.cachepoint):
            assert child.running(), f"{child.name} exited:\n{self.fleet.logs()}"
            with tls.channel(child.address) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=DEADLINE
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, child.name


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, coordinator_backend: str
) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("bounded")
    with coordinator_catalog(request, coordinator_backend, root), Fleet(root / "fleet") as fleet:
        coordinator = fleet.coordinator()
        cachepoint = fleet.cachepoint("cp", None, subscribe=())
        image = root / "v1.img"
        random_image(image, 16 * MiB, seed=71)
        publish(root / "admin", coordinator.address, image, "production")
        data = image.read_bytes()
        ids = [hashlib.sha256(data[i : i + 64 * KiB]).digest() for i in range(0, len(data), 64 * KiB)]
        yield Servers(fleet, coordinator, cachepoint, ids, root)


def raw_block(data: bytes) -> blocks_pb2.StoredBlock:
    return blocks_pb2.StoredBlock(
        id=hashlib.sha256(data).digest(), codec=CODEC_RAW, raw_size=len(data), payload=data
    )


def present(address: str, ids: list[bytes]) -> list[bool]:
    """HasBlocks for blocks of no version: with TLS the answer is always "missing" (no caller learns
    of blocks no version it may read references), so what it shows is the plaintext run's."""
    with tls.channel(address) as ch:
        reply = blocks_pb2_grpc.BlockExchangeStub(ch).HasBlocks(
            blocks_pb2.HasBlocksRequest(ids=b"".join(ids)), timeout=DEADLINE
        )
    return [bool(reply.present[i // 8] >> (i % 8) & 1) for i in range(len(ids))]


def push(address: str, batches: list[blocks_pb2.BlockBatch]) -> blocks_pb2.PushBlocksResponse:
    options = [("grpc.max_send_message_length", 128 * MiB)]
    with tls.channel(address, "publisher", options=options) as ch:
        return blocks_pb2_grpc.BlockExchangeStub(ch).PushBlocks(iter(batches), timeout=DEADLINE)


# -- pushed and committed blocks -------------------------------------------------------------------


def test_a_pushed_block_larger_than_the_largest_block_size_is_refused_and_not_stored(
    servers: Servers,
) -> None:
    # What an anonymous client did: one 50 MiB "block", its id honestly its SHA-256.
    block = raw_block(os.urandom(50 * MiB))
    with pytest.raises(grpc.RpcError) as refused:
        push(servers.coordinator.address, [blocks_pb2.BlockBatch(blocks=[block])])
    err = refused.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert block.id.hex() in err.details() and str(MAX_STORED_SIZE) in err.details(), err.details()
    assert present(servers.coordinator.address, [block.id]) == [False]
    servers.assert_serving()


def test_a_pushed_zstd_frame_that_declares_more_than_the_largest_block_size_is_refused(
    servers: Servers,
) -> None:
    data = bytes(50 * MiB)  # a few KiB once compressed: small on the wire, 50 MiB once decoded
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    assert len(frame) < 64 * KiB
    block = blocks_pb2.StoredBlock(
        id=hashlib.sha256(data).digest(), codec=CODEC_ZSTD, raw_size=len(data), payload=frame
    )
    with pytest.raises(grpc.RpcError) as refused:
        push(servers.coordinator.address, [blocks_pb2.BlockBatch(blocks=[block])])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"decodes to {len(data)} bytes" in refused.value.details(), refused.value.details()
    assert present(servers.coordinator.address, [block.id]) == [False]
    servers.assert_serving()


def test_a_pushed_lz4_value_that_declares_more_than_the_largest_block_size_is_refused(
    servers: Servers,
) -> None:
    data = bytes(64 * KiB)
    packed = encode_fast(data)
    lying = (1 << 30).to_bytes(4, "little") + packed[5:]  # a few bytes that claim 1 GiB decoded
    block = blocks_pb2.StoredBlock(
        id=hashlib.sha256(data).digest(), codec=CODEC_LZ4, raw_size=len(data), payload=lying
    )
    with pytest.raises(grpc.RpcError) as refused:
        push(servers.coordinator.address, [blocks_pb2.BlockBatch(blocks=[block])])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decodes to 1073741824 bytes" in refused.value.details(), refused.value.details()
    assert present(servers.coordinator.address, [block.id]) == [False]
    servers.assert_serving()


def test_a_commit_naming_a_block_larger_than_the_manifest_block_size_is_refused(servers: Servers) -> None:
    big = raw_block(os.urandom(1 * MiB))  # a legal block for a 1 MiB layer, stored as such
    assert push(servers.coordinator.address, [blocks_pb2.BlockBatch(blocks=[big])]).accepted == 1
    entry = FileEntry("disk.img", EntryType.FILE, 0o644, size=64 * KiB, blocks=big.id)
    raw = manifest_to_bytes(Manifest(64 * KiB, True, (entry,)))
    request = catalog_pb2.CommitRequest(
        layer="os/oversized",
        manifest=catalog_pb2.ManifestBlob(digest=manifest_digest(raw), manifest=raw),
        author="test",
    )
    with tls.channel(servers.coordinator.address, "publisher") as ch:
        catalog = catalog_pb2_grpc.CatalogStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            catalog.Commit(request, timeout=DEADLINE)
        err = refused.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert big.id.hex() in err.details() and "block size 65536" in err.details(), err.details()
        with pytest.raises(grpc.RpcError) as unknown:
            catalog.ListVersions(catalog_pb2.ListVersionsRequest(layer="os/oversized"), timeout=DEADLINE)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND, "a version was made"
    servers.assert_serving()


# -- fetched blocks --------------------------------------------------------------------------------


class OversizedPeer(blocks_pb2_grpc.BlockExchangeServicer):
    """A peer that answers FetchBlocks with one block, whatever was asked: no honest node does that
    with a block larger than the layer's block size."""

    def __init__(self, data: bytes) -> None:
        self.block = raw_block(data)

    async def FetchBlocks(  # noqa: N802 - gRPC method name
        self, request: blocks_pb2.FetchBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[blocks_pb2.BlockBatch]:
        yield blocks_pb2.BlockBatch(blocks=[self.block])


async def fetch_from(peer: OversizedPeer, store_dir: Path, block_size: int) -> tuple[Source, bool]:
    """Fetch the peer's block with a real Fetcher into a real store; the source afterwards, and
    whether the block was stored."""
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 128 * MiB)])
    blocks_pb2_grpc.add_BlockExchangeServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    store = Store.open(store_dir, writable=True, create=True)
    try:
        source = Source("hostile", f"127.0.0.1:{port}", SourceClass.SITE)
        with pytest.raises(PullIncomplete):
            await Fetcher(store, [source], block_size=block_size).fetch([peer.block.id], "os/x@1")
        return source, store.blocks.has(peer.block.id)
    finally:
        store.close()
        await server.stop(None)


def test_a_fetched_block_larger_than_the_layer_block_size_is_refused_and_its_peer_dropped(
    tmp_path: Path,
) -> None:
    peer = OversizedPeer(os.urandom(1 * MiB))  # hashes to its id: only its size is wrong
    source, stored = asyncio.run(fetch_from(peer, tmp_path / "store", block_size=64 * KiB))
    assert not stored
    assert source.sent_corrupt and "block size 65536" in source.dropped, source.dropped


def test_a_fetched_message_far_over_any_block_is_refused_before_it_is_kept(tmp_path: Path) -> None:
    peer = OversizedPeer(os.urandom(50 * MiB))
    source, stored = asyncio.run(fetch_from(peer, tmp_path / "store", block_size=4 * MiB))
    assert not stored
    assert "RESOURCE_EXHAUSTED" in source.dropped and "larger than max" in source.dropped, source.dropped


# -- malformed requests ----------------------------------------------------------------------------


def malformed_call(target: str, method: str, streaming: str) -> grpc.RpcError:
    with tls.channel(target, "publisher", "node", "auditor", "admin") as ch:
        with pytest.raises(grpc.RpcError) as refused:
            if streaming == "request":
                ch.stream_unary(method, request_serializer=None, response_deserializer=None)(
                    iter([GARBAGE]), timeout=DEADLINE
                )
            elif streaming == "response":
                call = ch.unary_stream(method, request_serializer=None, response_deserializer=None)
                list(call(GARBAGE, timeout=DEADLINE))
            else:
                ch.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    GARBAGE, timeout=DEADLINE
                )
    return refused.value


CASES = [
    ("coordinator", "/cachepoint.v1.Catalog/Commit", "unary"),
    ("coordinator", "/cachepoint.v1.BlockExchange/PushBlocks", "request"),
    ("coordinator", "/cachepoint.v1.Fleet/Register", "unary"),
    ("coordinator", "/cachepoint.v1.History/Export", "response"),
    ("cachepoint", "/cachepoint.v1.BlockExchange/FetchBlocks", "response"),
    ("cachepoint", "/cachepoint.v1.Catalog/Resolve", "unary"),
    ("agent", "/cachepoint.v1.Agent/Ingest", "unary"),
]


@pytest.mark.parametrize(("server", "method", "streaming"), CASES)
def test_malformed_request_bytes_get_invalid_argument_and_one_log_line(
    servers: Servers, server: str, method: str, streaming: str
) -> None:
    child = servers.coordinator if server == "coordinator" else servers.cachepoint
    target = f"unix:{servers.cachepoint.ready['agent']}" if server == "agent" else child.address
    before = child.stderr()
    err = malformed_call(target, method, streaming)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "not a valid message" in err.details(), err.details()

    def logged() -> list[str] | None:
        new = child.stderr()[len(before) :]
        lines = [line for line in new.splitlines() if method in line]
        return lines or None

    lines = wait_until(f"{child.name} to log the refusal", logged, 10.0)
    assert len(lines) == 1 and "malformed" in lines[0], lines
    assert "Traceback" not in child.stderr()[len(before) :]
    servers.assert_serving()


# -- streams per peer ------------------------------------------------------------------------------


def refused_when_all_held(
    stub: blocks_pb2_grpc.BlockExchangeStub, held: list[HeldPush]
) -> tuple[HeldPush, grpc.RpcError]:
    """Once every stream of ``held`` runs at the coordinator: a further push, and its refusal. Probes
    until one is refused as busy (HasBlocks cannot tell: with TLS it reports no block outside a
    version); a held stream that lost its slot to a probe in the start-up race is started again."""
    deadline = time.monotonic() + DEADLINE
    while True:
        for i, h in enumerate(held):
            if h.future.done():
                held[i] = HeldPush(stub)
        probe = HeldPush(stub)
        probe.release.set()
        try:
            probe.future.result(timeout=DEADLINE)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not any(h.future.done() for h in held):
                return probe, err
        assert time.monotonic() < deadline, "the held streams never filled the per-peer limit"
        time.sleep(0.1)


class HeldPush:
    """A PushBlocks stream that sends one small block, then waits until released."""

    def __init__(self, stub: blocks_pb2_grpc.BlockExchangeStub) -> None:
        self.block = raw_block(os.urandom(4 * KiB))
        self.release = threading.Event()
        self.future = stub.PushBlocks.future(self._batches(), timeout=DEADLINE)

    def _batches(self) -> Iterator[blocks_pb2.BlockBatch]:
        yield blocks_pb2.BlockBatch(blocks=[self.block])
        self.release.wait(DEADLINE)


def test_push_streams_beyond_the_per_peer_limit_are_refused_until_one_ends(servers: Servers) -> None:
    address = servers.coordinator.address
    with tls.channel(address, "publisher") as ch:
        stub = blocks_pb2_grpc.BlockExchangeStub(ch)
        held = [HeldPush(stub) for _ in range(PEER_STREAMS)]
        try:
            extra, err = refused_when_all_held(stub, held)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert f"the limit per peer is {PEER_STREAMS}" in err.details(), err.details()
            assert any(key == BUSY_KEY for key, _ in err.trailing_metadata() or ())
            assert present(address, [extra.block.id]) == [False]

            held[0].release.set()
            assert held[0].future.result(timeout=DEADLINE).accepted == 1
            after = HeldPush(stub)
            after.release.set()
            assert after.future.result(timeout=DEADLINE).accepted == 1, "a freed slot was not given again"
        finally:
            for h in held:
                h.release.set()
            for h in held:
                h.future.result(timeout=DEADLINE)
    servers.assert_serving()


def test_a_pull_waits_out_a_source_at_its_stream_limit_instead_of_dropping_it(servers: Servers) -> None:
    """The test holds every FetchBlocks slot of 127.0.0.1 at the coordinator (streams it reads no
    further, so flow control keeps them open: a fixed window, far less than the 16 MiB asked for); a
    pull from the same address is refused as busy, and completes once the slots are given back,
    instead of failing with the coordinator dropped."""
    address = servers.coordinator.address
    request = blocks_pb2.FetchBlocksRequest(ids=b"".join(servers.version_ids), version=f"{LAYER}@1")
    # Without BDP probing a held stream's window stays fixed (about 1 MiB reached such a client
    # unread, every time). With it the window grows while nobody reads: 4 to 8 MiB within 4 s
    # here, and once past the 16 MiB asked for, a held stream finished unread, its slot went to
    # the pull, and the pull was never refused.
    channels = [tls.channel(address, options=[("grpc.http2.bdp_probe", 0)]) for _ in range(PEER_STREAMS)]
    calls = []
    try:
        for ch in channels:
            call = blocks_pb2_grpc.BlockExchangeStub(ch).FetchBlocks(request, timeout=120)
            next(call)  # its stream is running at the coordinator; 15 MiB more wait behind it
            calls.append(call)
        before = servers.coordinator.stderr()
        store = servers.root / "puller"
        pool = ThreadPoolExecutor(1)
        pull = pool.submit(cachepoint_cli, store, "pull", f"{LAYER}@1", "--from", address, check=False)
        pool.shutdown(wait=False)

        def refused() -> bool:
            return "FetchBlocks: refused a stream" in servers.coordinator.stderr()[len(before) :]

        wait_until("the coordinator to refuse the pull's stream as busy", refused, 60.0)
        time.sleep(0.5)  # the pull's streams are pausing now, not dropped
        for call in calls:
            call.cancel()
        result = pull.result(timeout=120)
        assert result.code == 0, result.err
    finally:
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()
    servers.assert_serving()
