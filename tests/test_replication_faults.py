"""Replication under faults: a peer that lies about block contents, a pull killed with SIGKILL in the
middle, and a coordinator that goes away and comes back.

Each test runs real daemons and the real `cachepoint` command as child processes on loopback. The
only servers inside the test process are the ones that play a fault: a fake BlockExchange peer that
corrupts what it sends, and a TCP proxy that slows a transfer down without changing a byte.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachepoint.samples import generate, mutate
from cachepoint.store.store import Store
from cachepoint.v1 import blocks_pb2, blocks_pb2_grpc, fleet_pb2, fleet_pb2_grpc, version_pb2
from cachepoint.wire import stored_block_to_pb
from tests.conftest import REPO, cli_env
from tests.fleet import (
    LAYER,
    PRODUCTION,
    Fleet,
    ThrottledProxy,
    cachepoint_cli,
    cli_json,
    export_digest,
    fleet_nodes,
    free_port,
    publish,
    random_image,
    sha256_file,
    stored_block_ids,
    wait_until,
)

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MiB = 1024 * 1024
RECONNECT_TIMEOUT = 60.0  # heartbeats retry with backoff (up to 30 s); a bound, not a speed claim


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet") as running:
        yield running


# -- a peer that serves corrupted blocks ------------------------------------------------------------


class LyingPeer(blocks_pb2_grpc.BlockExchangeServicer):
    """Answers FetchBlocks with the requested ids and real stored values, but every second block has
    one payload byte flipped: its bytes no longer hash to its id. (Mixing good and bad blocks in one
    batch checks that the good ones are kept and only the bad ones refused.)"""

    def __init__(self, values: dict[bytes, bytes]) -> None:
        self.values = values
        self.requests = 0
        self.corrupted = 0

    def FetchBlocks(  # noqa: N802 - gRPC method name
        self, request: blocks_pb2.FetchBlocksRequest, context: grpc.ServicerContext
    ) -> Iterator[blocks_pb2.BlockBatch]:
        self.requests += 1
        ids = [request.ids[i : i + 32] for i in range(0, len(request.ids), 32)]
        batch = blocks_pb2.BlockBatch()
        for index, digest in enumerate(ids):
            value = self.values[digest]
            if index % 2:
                value = value[:-1] + bytes((value[-1] ^ 0xFF,))
                self.corrupted += 1
            batch.blocks.append(stored_block_to_pb(digest, value))
            if len(batch.blocks) == 16:
                yield batch
                batch = blocks_pb2.BlockBatch()
        if batch.blocks:
            yield batch


def stored_values(store_dir: Path, ids: set[bytes]) -> dict[bytes, bytes]:
    with Store.open(store_dir) as store:
        ordered = sorted(ids)
        values = store.blocks.raw_many(ordered)
    assert all(value is not None for value in values), "the publisher's store lacks a block it published"
    return {digest: value for digest, value in zip(ordered, values, strict=True) if value is not None}


def test_a_peer_serving_corrupted_blocks_is_dropped_and_no_bad_block_is_stored(
    fleet: Fleet, tmp_path: Path
) -> None:
    coordinator = fleet.coordinator()
    image = tmp_path / "v1.img"
    generate(image, 16 * MiB, seed=31)
    ids = stored_block_ids(image)
    admin = tmp_path / "admin"
    publish(admin, coordinator.address, image, "production")

    liar = LyingPeer(stored_values(admin, ids))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    blocks_pb2_grpc.add_BlockExchangeServicer_to_server(liar, server)
    liar_address = fleet.add_port(server, "liar")
    server.start()

    # The puller is a plain `cachepoint pull`; its fleet identity is its device name. Registering that
    # name in site a makes the liar, also in site a, its nearest source: asked before the origin.
    home = tmp_path / "puller-home"
    (home / "xdg-config" / "cachepoint").mkdir(parents=True)
    (home / "xdg-config" / "cachepoint" / "config.toml").write_text('device = "puller"\n')
    puller = home / "store"

    stop_heartbeats = threading.Event()
    # With TLS each node registers under its own certificate's name.
    channel = fleet.channel(coordinator.address, "node", name="liar")
    puller_channel = fleet.channel(coordinator.address, "node", name="puller")
    fleet_stub = fleet_pb2_grpc.FleetStub(channel)
    holds_v1 = fleet_pb2.HeartbeatRequest(node_id="liar", complete=[version_pb2.Ref(layer=LAYER, number=1)])

    def heartbeat() -> None:
        # Keeps the liar healthy in the registry however long the machine takes to start the pull.
        while True:
            try:
                fleet_stub.Heartbeat(holds_v1, timeout=10)
            except grpc.RpcError:
                pass
            if stop_heartbeats.wait(1.0):
                return

    beater = threading.Thread(target=heartbeat, daemon=True)
    try:
        # The puller serves nothing; its registered address is one where nothing listens.
        puller_node = fleet_pb2.NodeInfo(node_id="puller", site="a", address=f"127.0.0.1:{free_port()}")
        liar_node = fleet_pb2.NodeInfo(node_id="liar", site="a", address=liar_address)
        fleet_pb2_grpc.FleetStub(puller_channel).Register(
            fleet_pb2.RegisterRequest(node=puller_node), timeout=10
        )
        fleet_stub.Register(fleet_pb2.RegisterRequest(node=liar_node), timeout=10)
        beater.start()
        fleet.wait_fleet_holds(coordinator.address, "liar", f"{LAYER}@1")
        run = cachepoint_cli(puller, "pull", PRODUCTION, "--from", coordinator.address, "--json")
    finally:
        stop_heartbeats.set()
        if beater.is_alive():
            beater.join(15)
        server.stop(grace=None)
        channel.close()
        puller_channel.close()

    result: dict[str, Any] = run.json()
    assert liar.requests > 0 and liar.corrupted > 0, "the liar was never asked: the test proves nothing"
    assert result["planned_blocks"] == len(ids)
    assert result["fetched_blocks"] == len(ids), result
    assert result["bad_blocks"] > 0, result
    by_name = {s["name"]: s for s in result["sources"]}
    assert set(by_name) == {"liar", "origin"}, result
    assert by_name["liar"]["class"] == "site"
    assert by_name["liar"]["failures"] >= 1 and by_name["liar"]["dropped"], by_name["liar"]
    assert "corrupt" in by_name["liar"]["dropped"]
    assert by_name["origin"]["failures"] == 0 and by_name["origin"]["dropped"] is None
    assert by_name["liar"]["blocks"] + by_name["origin"]["blocks"] == len(ids)
    # The drop is logged, naming the source and its address.
    assert "liar" in run.err and liar_address in run.err, run.err

    fsck = cli_json(puller, "fsck")
    assert fsck["ok"] and fsck["problems"] == [] and fsck["unreferenced_blocks"] == 0, fsck
    assert export_digest(puller, PRODUCTION, tmp_path / "export.img") == sha256_file(image)


# -- a pull killed in the middle ---------------------------------------------------------------------


def present_blocks(store_dir: Path, ids: set[bytes]) -> int:
    with Store.open(store_dir) as store:
        return sum(1 for digest in ids if store.blocks.has(digest))


def test_a_pull_killed_mid_transfer_keeps_its_verified_blocks_and_the_next_pull_fetches_only_the_rest(
    fleet: Fleet, tmp_path: Path
) -> None:
    coordinator = fleet.coordinator()
    image = tmp_path / "random.img"
    random_image(image, 32 * MiB, seed=41)
    ids = stored_block_ids(image)
    total = len(ids)
    assert total == 512  # random data: every block distinct, none a hole
    publish(tmp_path / "admin", coordinator.address, image, "production")
    puller = tmp_path / "puller"
    fleet.identity(puller)  # the pull below is a child of its own, not run_cli

    # 32 MiB at 8 MiB/s takes ~4 s through the proxy: long enough to land a kill in the middle.
    with ThrottledProxy(coordinator.address, 8 * MiB) as proxy:
        child = subprocess.Popen(
            [sys.executable, "-m", "cachepoint", "pull", PRODUCTION, "--from", proxy.address, "--json"],
            env=cli_env(puller),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:

            def some_stored() -> int | None:
                if child.poll() is not None:
                    raise RuntimeError(f"the pull ended before it could be killed: {child.communicate()}")
                try:
                    count = present_blocks(puller, ids)
                except Exception:  # not created yet, or mid-creation: not there yet
                    return None
                return count if count >= total // 4 else None

            wait_until("the pull to store a quarter of the blocks", some_stored, 60, interval=0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(15)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(15)
            child.communicate()
        assert proxy.forwarded > 0

    # What the killed pull left: verified blocks only, and no version.
    present = present_blocks(puller, ids)
    assert 0 < present < total, f"{present} of {total} blocks present: the kill did not land mid-transfer"
    with Store.open(puller) as store:
        assert store.catalog.all_versions() == [], "a partial pull must not list the version"

    resumed = cli_json(puller, "pull", PRODUCTION, "--from", coordinator.address)
    assert resumed["already_local"] is False
    # Nothing stored before the kill is fetched again.
    assert resumed["planned_blocks"] == total - present, (present, resumed)
    assert resumed["fetched_blocks"] == total - present, (present, resumed)
    assert resumed["bad_blocks"] == 0

    fsck = cli_json(puller, "fsck")
    assert fsck["ok"] and fsck["unreferenced_blocks"] == 0, fsck
    assert export_digest(puller, PRODUCTION, tmp_path / "export.img") == sha256_file(image)


# A `cachepoint pull` whose process dies the moment it closes its store: RocksDB's close, which
# flushes every memtable, never runs. What the pull wrote without the WAL survives only if it made it
# durable itself before the commit.
DIE_AT_CLOSE = """
import os, sys
from cachepoint.store import db
db.StoreDB.close = lambda self: os._exit(0)
sys.argv = ["cachepoint", *sys.argv[1:]]
from cachepoint.cli import main
main()
"""


def test_a_pull_that_dies_right_after_its_commit_keeps_every_block_of_the_version(
    fleet: Fleet, tmp_path: Path
) -> None:
    """`cachepoint pull` writes the blocks it fetches once, without the WAL (BlockStore.put_fetched),
    and flushes them before the version commits: a version listed here has all its blocks, even when
    the process dies before RocksDB's close."""
    coordinator = fleet.coordinator()
    image = tmp_path / "random.img"
    random_image(image, 8 * MiB, seed=47)  # under FLUSH_EVERY: no background flush happens first
    publish(tmp_path / "admin", coordinator.address, image, "production")
    puller = tmp_path / "puller"
    fleet.identity(puller)
    died = subprocess.run(
        [sys.executable, "-c", DIE_AT_CLOSE, "pull", PRODUCTION, "--from", coordinator.address, "--json"],
        env=cli_env(puller),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode == 0, died.stderr
    with Store.open(puller) as store:
        assert [v.number for v in store.catalog.all_versions()] == [1], "the pull did not commit"
    fsck = cli_json(puller, "fsck")
    assert fsck["ok"] and fsck["problems"] == [], fsck
    assert export_digest(puller, PRODUCTION, tmp_path / "export.img") == sha256_file(image)


def test_a_daemon_killed_right_after_it_commits_a_pull_keeps_every_block_of_the_version(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A daemon's pulls also write their blocks once (config ``pull_wal = false``, the default) and
    flush them before the version commits: a SIGKILL the moment the version is listed loses none."""
    coordinator = fleet.coordinator()
    image = tmp_path / "random.img"
    random_image(image, 8 * MiB, seed=48)  # under FLUSH_EVERY: no background flush happens first
    publish(tmp_path / "admin", coordinator.address, image, "production")
    node = fleet.cachepoint("blade", coordinator.address)
    fleet.wait_holds(node, 1)
    node.kill()  # no RocksDB close, no memtable flush: only what the pull made durable remains
    with Store.open(node.store) as store:
        assert [v.number for v in store.catalog.all_versions()] == [1]
    fsck = cli_json(node.store, "fsck")
    assert fsck["ok"] and fsck["problems"] == [], fsck
    assert export_digest(node.store, PRODUCTION, tmp_path / "export.img") == sha256_file(image)


def test_gc_in_the_daemon_keeps_the_blocks_of_a_pull_in_flight(fleet: Fleet, tmp_path: Path) -> None:
    """The blocks a pull has stored are named by no version until it commits: the daemon's GC must
    leave them, or the pull would commit a version whose blocks are gone."""
    coordinator = fleet.coordinator()
    image = tmp_path / "random.img"
    random_image(image, 32 * MiB, seed=43)
    ids = stored_block_ids(image)
    publish(tmp_path / "admin", coordinator.address, image, "production")
    with ThrottledProxy(coordinator.address, 8 * MiB) as proxy:  # ~4 s for the whole pull
        node = fleet.cachepoint("blade", proxy.address, subscribe=())
        puller = subprocess.Popen(
            [sys.executable, "-m", "cachepoint", "pin", PRODUCTION, "--json"],  # a pull by the daemon
            env=cli_env(node.store),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:

            def some_stored() -> int | None:
                if puller.poll() is not None:
                    raise RuntimeError(f"the pull ended before the GC could run: {puller.communicate()}")
                count = present_blocks(node.store, ids)
                return count if count >= len(ids) // 4 else None

            present = wait_until("the pull to store a quarter of the blocks", some_stored, 60, interval=0.05)
            collected = cli_json(node.store, "gc")
            assert collected["blocks_removed"] == 0, collected
            out, err = puller.communicate(timeout=120)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
    assert puller.returncode == 0, err
    assert 0 < present < len(ids), "the GC ran in the middle of the pull"
    fsck = cli_json(node.store, "fsck")
    assert fsck["ok"] and fsck["unreferenced_blocks"] == 0, fsck


# -- the coordinator goes away and comes back ----------------------------------------------------------


def test_with_the_coordinator_down_cachepoints_keep_serving_and_they_recover_when_it_returns(
    fleet: Fleet, tmp_path: Path
) -> None:
    # A fixed port: the restarted coordinator must come back where the daemons look for it.
    listen = f"127.0.0.1:{free_port()}"
    data = tmp_path / "coordinator-data"
    coordinator = fleet.coordinator(data=data, listen=listen)
    assert coordinator.address == listen
    n1 = fleet.cachepoint("n1", listen, site="a")
    n2 = fleet.cachepoint("n2", listen, site="b")

    v1_image = tmp_path / "v1.img"
    generate(v1_image, 16 * MiB, seed=51)
    v1_ids = stored_block_ids(v1_image)
    admin = tmp_path / "admin"
    publish(admin, listen, v1_image, "production")
    for node in (n1, n2):
        fleet.wait_holds(node, 1)

    assert coordinator.stop() == 0, coordinator.stderr()

    # What the cachepoints hold stays readable.
    for node in (n1, n2):
        digest = export_digest(node.store, PRODUCTION, tmp_path / f"down-{node.name}.img")
        assert digest == sha256_file(v1_image), node.name
    # And servable: a node that has no coordinator to ask pulls straight from n1, which serves the
    # Catalog reads and BlockExchange itself (and has no Fleet, so it is the only source).
    laptop = tmp_path / "laptop"
    pulled = cli_json(laptop, "pull", PRODUCTION, "--from", n1.address)
    assert pulled["fetched_blocks"] == len(v1_ids), pulled
    assert [(s["address"], s["blocks"], s["failures"]) for s in pulled["sources"]] == [
        (n1.address, len(v1_ids), 0)
    ]
    assert export_digest(laptop, PRODUCTION, tmp_path / "laptop.img") == sha256_file(v1_image)

    for node in (n1, n2):
        wait_until(
            f"{node.name} to report the coordinator unreachable",
            lambda node=node: node.status()["coordinator_connected"] is False,
            RECONNECT_TIMEOUT,
            logs=fleet.logs,
        )
        assert node.running(), fleet.logs()

    restarted = fleet.coordinator(data=data, listen=listen, name="coordinator-restarted")
    assert restarted.address == listen
    # The catalog survived the restart; the daemons re-register and their subscriptions resume.
    v2_image = tmp_path / "v2.img"
    mutate(v1_image, v2_image, 0.05, seed=52)
    published = publish(admin, listen, v2_image, "production")
    assert published["version"] == 2
    assert published["blocks_sent"] == len(stored_block_ids(v2_image) - v1_ids)
    for node in (n1, n2):
        fleet.wait_holds(node, 2)
        # The heartbeat's retry backoff grows while the coordinator is away (~5 s here after ~8 s
        # down), so reconnection may trail the subscription; the bound leaves room for a slow machine.
        wait_until(
            f"{node.name} to reconnect",
            lambda node=node: node.status()["coordinator_connected"],
            RECONNECT_TIMEOUT,
            logs=fleet.logs,
        )
        digest = export_digest(node.store, PRODUCTION, tmp_path / f"up-{node.name}.img")
        assert digest == sha256_file(v2_image), node.name
    for node_id in ("n1", "n2"):
        fleet.wait_fleet_holds(listen, node_id, f"{LAYER}@2", timeout=RECONNECT_TIMEOUT)
    assert set(fleet_nodes(listen)) == {"n1", "n2"}
