"""Disk-full headroom: a daemon's pulls stop at min_free and resume when space returns, the blocks of a
pull that gave up are collected, and `gc` runs (and gives space back) on a completely full disk.

The node's store lives on a small tmpfs in its own mount namespace (tests/small_fs.py), reached by
every process through /proc/HOLDER/root; the coordinator, the publisher's store, the images and the
exports live on the test's own directory, so only the node's store and the filler files take the
tmpfs. The coordinator and the node are real child processes (tests/fleet.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachepoint.rpc.channel import BATCH_BYTES
from tests.conftest import sha256_file
from tests.fleet import (
    BLOCK,
    Child,
    Fleet,
    Node,
    cachepoint_cli,
    cli_json,
    export_digest,
    publish,
    random_image,
    stored_block_ids,
    wait_until,
)
from tests.small_fs import SmallFilesystem, small_filesystem

MiB = 1 << 20
FS_SIZE = "96M"
ROOM_LEFT = 56 * MiB  # what the filler leaves free: less than the big version needs
BIG = 64 * MiB
FETCH_BATCH = BATCH_BYTES + 2 * BLOCK  # a FetchBlocks message: 1 MiB and the block that crossed it
PAUSE_TIMEOUT = 60.0
SAMPLE_SECONDS = 0.005


@dataclass
class Scene:
    fs: SmallFilesystem
    fleet: Fleet
    coordinator: Child
    admin: Path  # the publisher's store, off the tmpfs
    images: Path

    @property
    def store(self) -> Path:
        return self.fs.path / "store"

    def publish(self, name: str, size: int, seed: int) -> Path:
        image = self.images / name
        random_image(image, size, seed)
        publish(self.admin, self.coordinator.address, image, "production")
        return image

    def node(self) -> Node:
        return self.fleet.cachepoint("edge", self.coordinator.address, store=self.store, min_free=None)

    def wait_paused(self, node: Node, pauses: int = 1) -> dict[str, Any]:
        """Until the node's status says its pulls are paused, for the ``pauses``-th time."""

        def probe() -> dict[str, Any] | None:
            status = node.status()
            sub = node.subscription(status)
            paused = status["space"]["pulls_paused"] and sub["state"] == "paused"
            return status if paused and node.stderr().count("pulls paused") >= pauses else None

        return wait_until("the node's pulls to pause", probe, PAUSE_TIMEOUT, logs=self.fleet.logs)


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    images = tmp_path / "images"
    images.mkdir()
    with small_filesystem(tmp_path / "small", FS_SIZE) as fs, Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        yield Scene(fs, fleet, coordinator, tmp_path / "admin", images)


class LowestFree:
    """Samples the file system's free space on a thread until stopped; keeps the lowest seen."""

    def __init__(self, fs: SmallFilesystem) -> None:
        self.fs = fs
        self.lowest = fs.free()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="free-space-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.lowest = min(self.lowest, self.fs.free())

    def __enter__(self) -> LowestFree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def fsck(store: Path) -> dict[str, Any]:
    report = cli_json(store, "fsck")
    assert report["ok"], report
    return report


def test_a_daemon_pauses_pulls_at_min_free_and_resumes_when_space_returns(scene: Scene) -> None:
    filler = scene.fs.fill("filler", leave=ROOM_LEFT)
    image = scene.publish("big.img", BIG, seed=1)
    with LowestFree(scene.fs) as sampler:
        node = scene.node()
        status = scene.wait_paused(node)

    # It stopped at min_free (5% by default), never more than one fetch batch below it.
    space = status["space"]
    assert space["min_free"] == "5%"
    assert space["min_free_bytes"] == int(scene.fs.total() * 5 / 100)
    assert sampler.lowest >= space["min_free_bytes"] - FETCH_BATCH, (sampler.lowest, space)
    sub = node.subscription(status)
    assert "at min_free 5%" in sub["last_error"], sub
    text = cachepoint_cli(scene.store, "status").out
    assert "pulls paused:" in text and "at min_free 5%" in text, text
    assert "pulls paused" in node.stderr()
    # A pin asks the daemon for the same pull: refused with the same message, as out of space (exit 7).
    pin = cachepoint_cli(scene.store, "pin", "os/x:production", check=False)
    assert pin.code == 7 and "pulls paused" in pin.err and "at min_free 5%" in pin.err, (pin.code, pin.err)
    stored = fsck(scene.store)["unreferenced_blocks"]  # what the paused pull had stored
    wanted = len(stored_block_ids(image))
    assert 0 < stored < wanted

    filler.unlink()
    status = scene.fleet.wait_holds(node, 1)
    assert not status["space"]["pulls_paused"]
    assert "pulls resumed" in node.stderr()
    # The pull that completed fetched only what the paused one had not stored: the daemon counts the
    # paused pull's blocks too, so across both every block crossed exactly once.
    assert status["bytes_by_source"]["origin"]["blocks"] == wanted
    assert f"pulled os/x@1: {wanted - stored} blocks" in node.stderr()
    assert export_digest(scene.store, "os/x@1", scene.images / "out.img") == sha256_file(image)
    report = fsck(scene.store)
    assert report["versions"] == 1 and report["unreferenced_blocks"] == 0


def test_the_blocks_of_a_pull_that_gave_up_are_collected_by_gc(scene: Scene) -> None:
    scene.fs.fill("filler", leave=ROOM_LEFT)
    scene.publish("big.img", BIG, seed=2)
    node = scene.node()
    scene.wait_paused(node)

    # In the daemon: the paused pull no longer pins what it fetched, so its GC removes all of it.
    stored = fsck(scene.store)["unreferenced_blocks"]
    assert stored > 0
    gc = cli_json(scene.store, "gc")
    assert gc["blocks_removed"] == stored and gc["space_given_back"], gc

    # Space came back, so the pull ran again until min_free; then the daemon stops: the pull is
    # abandoned, and a GC without the daemon removes what it left.
    scene.wait_paused(node, pauses=2)
    node.stop()
    left = fsck(scene.store)["unreferenced_blocks"]
    assert left > 0
    gc = cli_json(scene.store, "gc")
    assert gc["blocks_removed"] == left and gc["space_given_back"], gc
    report = fsck(scene.store)
    assert report["unreferenced_blocks"] == 0 and report["versions"] == 0


def abandon_a_pull_on_a_full_disk(scene: Scene, held_size: int) -> tuple[Path, int]:
    """A node holds a version of ``held_size`` bytes, pauses pulling a bigger one, and stops; then the
    disk is filled to the last page. Returns the held image and how many blocks the pull left."""
    held = scene.publish("held.img", held_size, seed=3)
    node = scene.node()
    scene.fleet.wait_holds(node, 1)
    scene.fs.fill("filler", leave=ROOM_LEFT)
    scene.publish("big.img", BIG, seed=4)
    scene.wait_paused(node)
    node.stop()
    left = fsck(scene.store)["unreferenced_blocks"]
    assert left > 0
    scene.fs.fill("filler-2")
    assert scene.fs.free() == 0
    return held, left


def test_gc_runs_on_a_completely_full_disk_and_gives_the_space_back(scene: Scene) -> None:
    held, left = abandon_a_pull_on_a_full_disk(scene, held_size=4 * BLOCK)

    run = cachepoint_cli(scene.store, "gc", "--json", check=False)
    assert run.code == 0, f"gc on a full disk exited {run.code}:\n{run.out}\n{run.err}"
    gc = run.json()
    assert isinstance(gc, dict)
    assert gc["blocks_removed"] == left and gc["space_given_back"], gc
    # The space is free again, but for the reserve, which gc put back.
    reserve = scene.store / "reserve"
    assert reserve.stat().st_size == 1 * MiB
    assert scene.fs.free() >= gc["bytes_freed"] - reserve.stat().st_size - MiB, (scene.fs.free(), gc)
    report = fsck(scene.store)
    assert report["unreferenced_blocks"] == 0 and report["versions"] == 1
    assert export_digest(scene.store, "os/x@1", scene.images / "out.img") == sha256_file(held)


def test_gc_on_a_full_disk_says_when_it_has_no_room_to_give_space_back_and_a_later_gc_does(
    scene: Scene,
) -> None:
    # Rewriting 4 MiB of live blocks needs more than the 1 MiB reserve of a 96 MiB file system.
    held, left = abandon_a_pull_on_a_full_disk(scene, held_size=4 * MiB)

    run = cachepoint_cli(scene.store, "gc", "--json", check=False)
    assert run.code == 0, f"gc on a full disk exited {run.code}:\n{run.out}\n{run.err}"
    gc = run.json()
    assert isinstance(gc, dict)
    assert gc["blocks_removed"] == left and not gc["space_given_back"], gc
    assert "next gc" in gc["compaction"]["reason"], gc
    assert "space not given back yet" in run.err
    report = fsck(scene.store)
    assert report["unreferenced_blocks"] == 0 and report["versions"] == 1

    for name in ("filler", "filler-2"):
        (scene.fs.path / name).unlink()
    before = scene.fs.free()
    gc = cli_json(scene.store, "gc")
    assert gc["blocks_removed"] == 0 and gc["space_given_back"], gc
    assert scene.fs.free() >= before + left * BLOCK // 2, (before, scene.fs.free(), gc)
    # Compacted away: the next gc has nothing to compact.
    assert cli_json(scene.store, "gc")["compaction"] is None
    assert export_digest(scene.store, "os/x@1", scene.images / "out.img") == sha256_file(held)


def test_repair_runs_on_a_completely_full_disk_and_brings_the_damaged_catalog_back(scene: Scene) -> None:
    held, _ = abandon_a_pull_on_a_full_disk(scene, held_size=4 * BLOCK)
    # Damage the SST files that hold the version record and its "pushed" record (same key, two
    # families): one flipped byte in each data block.
    from cachepoint.store.store import Store

    wanted = b"os/x\x00" + (1).to_bytes(8, "big")
    with Store.open(scene.store) as store:
        names = [m["name"].lstrip("/") for m in store.db.db.live_files() if m["start_key"] == wanted]
    assert len(names) == 2, names
    for name in names:
        sst = scene.store / "db" / name
        data = bytearray(sst.read_bytes())
        data[40] ^= 0xFF
        sst.write_bytes(bytes(data))
    assert scene.fs.free() == 0
    assert cachepoint_cli(scene.store, "gc", "--json", check=False).code == 8  # refuses: cannot prove

    run = cachepoint_cli(scene.store, "repair", "--json", check=False)
    assert run.code == 0, f"repair on a full disk exited {run.code}:\n{run.out}\n{run.err}"
    report = run.json()
    assert isinstance(report, dict)
    assert report["recovered_from_journal"] == {"versions": 1, "pushed": 1}, report
    assert fsck(scene.store)["versions"] == 1
    # The repair used the reserve; once space returns, gc (which can prove the catalog again) runs.
    for name in ("filler", "filler-2"):
        (scene.fs.path / name).unlink()
    assert cachepoint_cli(scene.store, "gc", "--json").code == 0
    assert export_digest(scene.store, "os/x@1", scene.images / "out.img") == sha256_file(held)
