"""Unit fetch: a pull of a content-chunked version takes the units of its new chunks that the store
already holds from its own chunks, and fetches only the others (docs/design.md "Unit fetch").

Every pull is the real `cachepoint pull` against a real `cachepoint serve` on loopback. The only
servers inside the test process play a fault, over a real store and the real services: an older node
that answers FetchBlocks with whole blocks (it drops the request's unit fields, as a node written
before them parses the request), and a node that sends one unit with a flipped byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import rocksdict

from cachepoint.blocks import decode_block, encode_block
from cachepoint.chunking import ChunkParams
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.catalog_read import CatalogReadService
from cachepoint.slots import SlotLimits
from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2_grpc
from tests import tls
from tests.fleet import Fleet, cli_json, export_digest

KiB = 1024
UNIT = 4 * KiB
LAYER = "os/disk"
CONTENT = IngestOptions(LAYER, chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, 32 * KiB))


def _images(directory: Path) -> tuple[Path, Path]:
    """v1: 6 MiB of 4 KiB units (random, text-like, and zero runs). v2: a few hundred units patched
    with 16 bytes each (as a file system's metadata writes and a library's rebuild do), a run of new
    units, and a stretch moved by three units."""
    rng = random.Random(7)
    units = []
    for _ in range(6 * 256):
        kind = rng.random()
        if kind < 0.1:
            units.append(bytes(UNIT))
        elif kind < 0.5:
            units.append((rng.randbytes(64).hex() * 40).encode()[:UNIT])
        else:
            units.append(rng.randbytes(UNIT))
    v1 = b"".join(units)
    new = units[:900] + [rng.randbytes(UNIT) for _ in range(3)] + units[900:-3]
    for index in rng.sample(range(len(new)), 200):
        if any(new[index]):
            at = rng.randrange(UNIT - 16)
            new[index] = new[index][:at] + rng.randbytes(16) + new[index][at + 16 :]
    new[100:120] = [rng.randbytes(UNIT) for _ in range(20)]
    v2 = b"".join(new)
    (directory / "v1.img").write_bytes(v1)
    (directory / "v2.img").write_bytes(v2)
    return directory / "v1.img", directory / "v2.img"


def _new_units(v1: Path, v2: Path) -> int:
    """Distinct non-zero 4 KiB units of v2 that v1 has nowhere: what a unit fetch must move."""
    held = {v1.read_bytes()[at : at + UNIT] for at in range(0, v1.stat().st_size, UNIT)}
    data = v2.read_bytes()
    return len({data[at : at + UNIT] for at in range(0, len(data), UNIT)} - held - {bytes(UNIT)})


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with v1 and v2 of a content-chunked image, and what v2's new chunks take stored."""
    base = tmp_path_factory.mktemp("unit-origin")
    v1, v2 = _images(base)
    store_dir = base / "store"
    with Store.open(store_dir, writable=True, create=True) as store:
        ingest(store, v1, CONTENT)
        ingest(store, v2, CONTENT)
        ids = [
            set(store.catalog.manifest(store.catalog.resolve(f"{LAYER}@{n}").manifest_digest).block_ids())
            for n in (1, 2)
        ]
        new = sorted(ids[1] - ids[0])
        whole = sum(len(value or b"") for value in store.blocks.raw_many(new))
    return {
        "store": store_dir,
        "v1": v1,
        "v2": v2,
        "new_chunks": len(new),
        "a_new_chunk": new[0],
        "whole_bytes": whole,
        "new_units": _new_units(v1, v2),
        "v2_sha256": hashlib.sha256(v2.read_bytes()).hexdigest(),
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("unit-fleet")) as running:
        yield running


@pytest.fixture(scope="module")
def served(fleet: Fleet, origin: dict[str, Any]) -> str:
    """The address of a `cachepoint serve` of the origin store, for the module."""
    return fleet.serve_store("origin", origin["store"]).address


@pytest.fixture(scope="module")
def holding_v1(served: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store that pulled v1 (each test pulls v2 into a copy of it)."""
    store = tmp_path_factory.mktemp("holding-v1") / "store"
    _pull(store, f"{LAYER}@1", served)
    return store


def _receiver(holding_v1: Path, tmp_path: Path) -> Path:
    receiver = tmp_path / "receiver"
    shutil.copytree(holding_v1, receiver)
    return receiver


class _NodeThread:
    """A gRPC server in a thread of the test process, with the real Catalog reads and ``blocks`` (a
    BlockExchangeService playing a fault) over a store opened read-only."""

    def __init__(self, fleet: Fleet, name: str, store_dir: Path, blocks: type[BlockExchangeService]) -> None:
        self.store = Store.open(store_dir)
        self.blocks = blocks(self.store, ServeCounters(), False, SlotLimits(8, 8, 5.0, 30.0))
        self._fleet, self._name = fleet, name
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.address = ""
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))

    async def _serve(self) -> None:
        server = grpc.aio.server()
        blocks_pb2_grpc.add_BlockExchangeServicer_to_server(self.blocks, server)
        catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogReadService(self.store), server)
        self.address = self._fleet.add_port(server, self._name)
        self._stop = asyncio.Event()
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(None)

    def __enter__(self) -> _NodeThread:
        self._thread.start()
        assert self._ready.wait(30), "the in-process node did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()
        self.store.close()


class OlderNode(BlockExchangeService):
    """A node written before unit fetch: its FetchBlocksRequest has no fields 3 and 4, so it drops
    them while parsing and answers with whole blocks."""

    unit_requests = 0

    async def FetchBlocks(  # noqa: N802 - gRPC method name
        self, request: blocks_pb2.FetchBlocksRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if request.unit_size:
            type(self).unit_requests += 1
        old = blocks_pb2.FetchBlocksRequest(ids=request.ids, version=request.version)
        await super().FetchBlocks(old, context)


class FlippingNode(BlockExchangeService):
    """Sends the first unit answer it makes with one byte of its units flipped (a bad disk, a bad
    NIC, or a liar); every other answer as it should be."""

    flipped = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        write = self.fetches.write

        async def flip_first(context: grpc.aio.ServicerContext, batch: Any) -> None:
            for block in batch.blocks:
                if block.partial and not type(self).flipped:
                    units = bytearray(decode_block(bytes((block.codec,)) + block.payload))
                    units[len(units) // 2] ^= 0x01
                    encoded = encode_block(bytes(units))
                    block.codec, block.payload = encoded[0], encoded[1:]
                    type(self).flipped += 1
            await write(context, batch)

        self.fetches.write = flip_first  # type: ignore[method-assign]


def _pull(store: Path, ref: str, address: str) -> dict[str, Any]:
    return cli_json(store, "pull", ref, "--from", address)


def test_a_pull_of_a_content_chunked_version_fetches_only_the_units_this_store_lacks(
    served: str, holding_v1: Path, origin: dict[str, Any], tmp_path: Path
) -> None:
    receiver = _receiver(holding_v1, tmp_path)
    result = _pull(receiver, f"{LAYER}@2", served)

    units = result["unit_fetch"]
    assert result["planned_blocks"] == origin["new_chunks"] == result["fetched_blocks"], result
    assert units["chunks"] == origin["new_chunks"] and units["left_to_whole_fetch"] == 0, units
    # Exactly the new 4 KiB units cross, each once; every other unit of the new chunks was here.
    assert units["units_fetched"] == origin["new_units"], (units, origin["new_units"])
    assert units["units_local"] > 3 * units["units_fetched"], units
    assert units["bad_chunks"] == 0 and units["indexed"] == 0, units  # v1 arrived with its records
    # Far fewer bytes than the whole new chunks would have taken.
    assert result["fetched_bytes"] < origin["whole_bytes"] / 2, (result, origin["whole_bytes"])
    assert export_digest(receiver, f"{LAYER}@2", tmp_path / "v2.img") == origin["v2_sha256"]
    assert cli_json(receiver, "fsck")["ok"]


def test_a_node_without_unit_fetch_answers_with_whole_chunks_and_the_pull_takes_them(
    fleet: Fleet, holding_v1: Path, origin: dict[str, Any], tmp_path: Path
) -> None:
    receiver = _receiver(holding_v1, tmp_path)
    with _NodeThread(fleet, "older", origin["store"], OlderNode) as older:
        result = _pull(receiver, f"{LAYER}@2", older.address)
    units = result["unit_fetch"]
    assert OlderNode.unit_requests >= 1, "the pull never asked for unit digests: the test proves nothing"
    # Its whole blocks are kept as they come; what it was not asked for yet, the fetcher takes.
    assert 0 < units["whole_blocks"] <= origin["new_chunks"] == result["fetched_blocks"], result
    assert units["chunks"] == 0 and units["units_fetched"] == 0 and units["bad_chunks"] == 0, units
    assert export_digest(receiver, f"{LAYER}@2", tmp_path / "v2.img") == origin["v2_sha256"]
    assert cli_json(receiver, "fsck")["ok"]


def test_a_unit_that_does_not_match_its_digest_is_refused_and_its_chunk_fetched_whole(
    fleet: Fleet, holding_v1: Path, origin: dict[str, Any], tmp_path: Path
) -> None:
    receiver = _receiver(holding_v1, tmp_path)
    with _NodeThread(fleet, "flipping", origin["store"], FlippingNode) as flipping:
        result = _pull(receiver, f"{LAYER}@2", flipping.address)
    units = result["unit_fetch"]
    assert FlippingNode.flipped == 1, "no unit was sent: the test proves nothing"
    assert units["bad_chunks"] == 1, units
    # The window of the bad unit is left to the whole-chunk fetch, and no more units are asked for.
    assert 0 < units["left_to_whole_fetch"] <= origin["new_chunks"], units
    assert result["fetched_blocks"] == origin["new_chunks"] and result["bad_blocks"] == 0, result
    assert export_digest(receiver, f"{LAYER}@2", tmp_path / "v2.img") == origin["v2_sha256"]
    fsck = cli_json(receiver, "fsck")
    assert fsck["ok"] and fsck["problems"] == [], fsck


def test_a_store_written_before_unit_fetch_makes_its_unit_digests_once_and_pulls_only_new_units(
    served: str, holding_v1: Path, origin: dict[str, Any], tmp_path: Path
) -> None:
    receiver = _receiver(holding_v1, tmp_path)
    # What older code leaves: a store without the units family at all.
    options = rocksdict.Options(raw_mode=True)
    families = rocksdict.Rdict.list_cf(str(receiver / "db"), options)
    db = rocksdict.Rdict(str(receiver / "db"), options, column_families={f: options for f in families})
    db.drop_column_family(fmt.CF_UNITS)
    db.close()
    del db
    assert fmt.CF_UNITS not in rocksdict.Rdict.list_cf(str(receiver / "db"), options)

    result = _pull(receiver, f"{LAYER}@2", served)
    units = result["unit_fetch"]
    assert units["indexed"] > 0, units  # v1's chunks, hashed from their bytes for this pull
    assert units["units_fetched"] == origin["new_units"] and units["left_to_whole_fetch"] == 0, units
    assert export_digest(receiver, f"{LAYER}@2", tmp_path / "v2.img") == origin["v2_sha256"]
    assert cli_json(receiver, "fsck")["ok"]


def test_unit_requests_out_of_bounds_get_invalid_argument_naming_the_limit(
    served: str, origin: dict[str, Any]
) -> None:
    chunk = origin["a_new_chunk"]
    v2 = f"{LAYER}@2"
    cases = [
        (blocks_pb2.FetchBlocksRequest(ids=chunk, unit_size=3000), "unit_size 3000 is not a power of two"),
        (blocks_pb2.FetchBlocksRequest(ids=chunk, unit_masks=[b"\x01"]), "unit_masks without a unit_size"),
        (
            blocks_pb2.FetchBlocksRequest(ids=chunk, unit_size=UNIT, unit_masks=[b"\x01", b"\x01"]),
            "2 unit masks for 1 ids",
        ),
        (
            blocks_pb2.FetchBlocksRequest(ids=chunk, unit_size=UNIT, unit_masks=[bytes(200)]),
            "a unit mask is over 128 bytes",
        ),
        (  # a chunk is at most 128 KiB here: unit 799 is past its end
            blocks_pb2.FetchBlocksRequest(
                ids=chunk, unit_size=UNIT, unit_masks=[bytes(99) + b"\x80"], version=v2
            ),
            "names unit 799, the block has",
        ),
    ]
    with tls.channel(served) as ch:
        stub = blocks_pb2_grpc.BlockExchangeStub(ch)
        for request, text in cases:
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.FetchBlocks(request, timeout=30))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
            assert text in (raised.value.details() or ""), raised.value.details()
        # The server stays up and answers a good request: the chunk's unit digests.
        answer = [b for batch in stub.FetchBlocks(
            blocks_pb2.FetchBlocksRequest(ids=chunk, unit_size=UNIT, version=v2), timeout=30
        ) for b in batch.blocks]  # fmt: skip
        assert len(answer) == 1 and answer[0].id == chunk and len(answer[0].unit_digests) % 16 == 0, answer


def test_unit_digests_an_answer_makes_from_a_chunks_bytes_are_kept_for_the_next_puller(
    origin: dict[str, Any], tmp_path: Path
) -> None:
    """A locally ingested chunk has no unit record: the first digest answer decodes and hashes it, and
    keeps the record, so the next node's pull is answered from it. A read-only store answers alike."""
    from cachepoint.chunking import unit_digests

    store_dir = tmp_path / "store"
    with Store.open(store_dir, writable=True, create=True) as store:
        result = ingest(store, origin["v1"], CONTENT)
        assert result.version is not None
        new = [store.catalog.manifest(result.version.manifest_digest).entries[0].digests()[0]]
        assert store.units.get_many(new, UNIT) == {}, "an ingest keeps no unit records"
        service = BlockExchangeService(store, ServeCounters(), False, SlotLimits(8, 8, 5.0, 30.0))
        (answer,) = service._unit_answers(new, UNIT, None)
        want = unit_digests(decode_block(store.blocks.raw(new[0]) or b""), UNIT)
        assert answer.unit_digests == want
        assert store.units.get_many(new, UNIT) == {new[0]: want}
        (again,) = service._unit_answers(new, UNIT, None)  # answered from the record
        assert again.unit_digests == want
    with Store.open(store_dir) as read_only:
        service = BlockExchangeService(read_only, ServeCounters(), False, SlotLimits(8, 8, 5.0, 30.0))
        assert not service.keeps_records
        assert service._unit_answers(new, UNIT, None)[0].unit_digests == want


def test_a_unit_fetch_given_no_seed_loader_places_the_seed_its_assembler_reads(
    origin: dict[str, Any], tmp_path: Path
) -> None:
    """`pull` hands UnitFetch the seed it started placing early; without one, UnitFetch places its own,
    and that must be the seed its assembler takes units from (it once placed another, so every unit
    was fetched). The source here is a dead address: the seed is placed before any answer counts."""
    from cachepoint.chunking import unit_digests
    from cachepoint.replication.sources import Source, SourceClass
    from cachepoint.replication.unitfetch import UnitFetch, chunk_lengths
    from fleetlab.ports import quiet_port

    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        ingest(store, origin["v1"], CONTENT)
        ingest(store, origin["v2"], CONTENT)
        manifest = store.catalog.manifest(store.catalog.resolve(f"{LAYER}@2").manifest_digest)
        old_chunk = store.catalog.manifest(store.catalog.resolve(f"{LAYER}@1").manifest_digest).entries[0]
        held = unit_digests(decode_block(store.blocks.raw(old_chunk.digests()[0]) or b""), UNIT)[:16]
        dead = Source("origin", f"127.0.0.1:{quiet_port()}", SourceClass.ORIGIN)

        async def run() -> UnitFetch:
            fetch = UnitFetch(store, dead, UNIT, LAYER, stall=5.0, block_size=manifest.block_size)
            try:
                await fetch.fetch(chunk_lengths(manifest, {origin["a_new_chunk"]}), f"{LAYER}@2")
            finally:
                await dead.close()
            return fetch

        fetch = asyncio.run(run())
    assert fetch.result.units_fetched == 0 and fetch.result.left == 1, fetch.result
    assert fetch._assembler.seed.held(held) is not None, "the assembler's seed holds none of v1's units"
