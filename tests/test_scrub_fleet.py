"""A damaged block in a daemon's store is found by a scrub and fetched again from a peer of its site.

Real processes throughout: a coordinator and two `cachepoint serve` daemons of one site, a and b,
both holding os/x@1. b is stopped, one of its blocks is damaged on disk (below RocksDB's checksums,
or inside an SST file so that RocksDB refuses it), and b is started again on the same store. Then a
scrub, asked for through b's daemon or run on its schedule, must heal the block from a (counted
under "site" in b's status, nothing from the coordinator), after which fsck is clean, status and
fsck report the scrub, and the version exports byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachepoint.ids import BlockId
from cachepoint.samples import generate
from tests.damage import DAMAGE, Damage
from tests.fleet import (
    LAYER,
    Fleet,
    Node,
    cachepoint_cli,
    cli_json,
    export_digest,
    publish,
    sha256_file,
    wait_until,
)

IMAGE_SIZE = 8 * 1024 * 1024
SITE = "s"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet") as running:
        yield running


def source_blocks(status: dict[str, Any], source_class: str) -> int:
    return int(status["bytes_by_source"].get(source_class, {}).get("blocks", 0))


def damaged_pair(
    fleet: Fleet, tmp_path: Path, damage: Damage, scheduled: bool = False
) -> tuple[Node, Node, bytes, Path]:
    """a and b hold os/x@1; b is restarted after ``damage`` hit one of its blocks. Returns a, b, the
    victim and the published image. ``scheduled``: b may heal at once, so fsck cannot be asked
    first (the damage helpers check the damage themselves)."""
    image = tmp_path / "disk.img"
    generate(image, IMAGE_SIZE, seed=31)
    coordinator = fleet.coordinator()
    a = fleet.cachepoint("a", coordinator.address, site=SITE)
    b = fleet.cachepoint("b", coordinator.address, site=SITE)
    publish(tmp_path / "admin", coordinator.address, image, "production")
    fleet.wait_holds(a, 1)
    fleet.wait_holds(b, 1)
    assert b.stop() == 0, b.stderr()
    victim = damage(b.store)
    b = fleet.cachepoint("b", coordinator.address, site=SITE)
    fleet.wait_holds(b, 1)
    fleet.wait_fleet_holds(coordinator.address, "a", f"{LAYER}@1")
    fleet.wait_fleet_holds(coordinator.address, "b", f"{LAYER}@1")
    if scheduled:
        return a, b, victim, image
    # The damage is real: fsck (a read-only look while the daemon runs) names the block.
    broken = cachepoint_cli(b.store, "fsck", "--json", check=False)
    assert broken.code == 8, broken.out
    assert str(BlockId(victim)) in [p["subject"] for p in broken.json()["problems"]]  # type: ignore[index]
    return a, b, victim, image


def assert_healed(
    a: Node, b: Node, image: Path, tmp_path: Path, fleet: Fleet
) -> tuple[dict[str, Any], dict[str, Any]]:
    """b's fsck is clean, the block came from its site peer, and os/x@1 exports byte for byte.
    Returns b's status and fsck report."""
    status = b.status()
    assert source_blocks(status, "site") == 1, f"{status['bytes_by_source']}\n{fleet.logs()}"
    assert source_blocks(status, "origin") == 0 and source_blocks(status, "peer") == 0, status
    fsck = cli_json(b.store, "fsck")
    assert fsck["ok"] and fsck["problems"] == [], fsck
    assert fsck["scrub"] is not None and fsck["scrub"]["still_bad"] == 0, fsck
    assert export_digest(b.store, f"{LAYER}@1", tmp_path / "b.img") == sha256_file(image)
    assert a.running() and b.running() and fleet.children[0].running(), fleet.logs()
    return status, fsck


@pytest.mark.parametrize(("damage", "kind"), DAMAGE)
def test_a_scrub_through_the_daemon_fetches_a_damaged_block_again_from_a_site_peer(
    fleet: Fleet, tmp_path: Path, damage: Damage, kind: str
) -> None:
    a, b, victim, image = damaged_pair(fleet, tmp_path, damage)

    result = cachepoint_cli(b.store, "scrub", "--json", check=False)
    assert result.code == 0, f"scrub exited {result.code}:\n{result.out}\n{result.err}\n{fleet.logs()}"
    report = result.json()
    assert isinstance(report, dict)
    assert (report["corrupt_found"], report["healed"], report["still_bad"]) == (1, 1, 0), report
    assert report["healed_blocks"] == [str(BlockId(victim))]
    assert report["healed_from"] == {"site": {"blocks": 1, "bytes": report["healed_from"]["site"]["bytes"]}}

    status, fsck = assert_healed(a, b, image, tmp_path, fleet)
    assert status["scrub"] == report and fsck["scrub"] == report
    assert status["scrub_running"] is None

    # The next pass finds nothing left to heal.
    again = cli_json(b.store, "scrub")
    assert (again["corrupt_found"], again["still_bad"]) == (0, 0), again
    assert again["blocks_checked"] == report["blocks_checked"]


def test_a_scheduled_scrub_fetches_a_damaged_block_again_without_being_asked(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Every daemon of this fleet reads its config here (tests/conftest.py cli_env): scrub often.
    config = fleet.root / "xdg-config" / "cachepoint" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('scrub_every = "1s"\nscrub_rate = "0"\n')
    a, b, _, image = damaged_pair(fleet, tmp_path, DAMAGE[0].values[0], scheduled=True)

    def healed() -> dict[str, Any] | None:
        status = b.status()
        last = status["scrub"]
        return status if last and source_blocks(status, "site") == 1 and last["still_bad"] == 0 else None

    status = wait_until("b's scheduled scrub to heal the block", healed, 60.0, logs=fleet.logs)
    assert_healed(a, b, image, tmp_path, fleet)
    assert status["scrub"]["blocks_checked"] > 0
