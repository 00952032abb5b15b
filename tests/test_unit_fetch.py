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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import rocksdict

from cachepoint.chunking import ChunkParams
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking
from cachepoint.rpc.block_exchange import BlockExchangeService, ServeCounters
from cachepoint.rpc.catalog_read import CatalogReadService
from cachepoint.slots import SlotLimits
from cachepoint.store import format as fmt
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, catalog_pb2_grpc
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
        "whole_bytes": whole,
        "new_units": _new_units(v1, v2),
        "v2_sha256": hashlib.sha256(v2.read_bytes()).hexdigest(),
    }


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet") as running:
        yield running


def _pull(store: Path, ref: str, address: str) -> dict[str, Any]:
    return cli_json(store, "pull", ref, "--from", address)


def test_a_pull_of_a_content_chunked_version_fetches_only_the_units_this_store_lacks(
    fleet: Fleet, origin: dict[str, Any], tmp_path: Path
) -> None:
    node = fleet.serve_store("origin", origin["store"])
    receiver = tmp_path / "receiver"
    _pull(receiver, f"{LAYER}@1", node.address)
    result = _pull(receiver, f"{LAYER}@2", node.address)

    units = result["unit_fetch"]
    assert result["planned_blocks"] == origin["new_chunks"] == result["fetched_blocks"], result
    assert units["chunks"] == origin["new_chunks"] and units["left_to_whole_fetch"] == 0, units
    # Exactly the new 4 KiB units cross, each once; every other unit of the new chunks was here.
    assert units["units_fetched"] == origin["new_units"], (units, origin["new_units"])
    assert units["units_local"] > 3 * units["units_fetched"], units
    assert units["bad_chunks"] == 0 and units["indexed"] == 0, units  # v1 arrived with its records
    # Far fewer bytes than the whole new chunks would have taken.
    assert result["fetched_bytes"] < origin["whole_bytes"] / 2, (result["fetched_bytes"], origin["whole_bytes"])
    assert export_digest(receiver, f"{LAYER}@2", tmp_path / "v2.img") == origin["v2_sha256"]
    assert cli_json(receiver, "fsck")["ok"]
