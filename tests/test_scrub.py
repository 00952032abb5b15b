"""`cachepoint scrub` without a daemon: it finds a damaged block, changes nothing when there is no
fleet to heal from, heals from a coordinator when given one, and an interrupted pass goes on from
where it stopped."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from cachepoint.blocks import encode_block
from cachepoint.ids import BlockId
from cachepoint.replication.ratelimit import parse_rate
from cachepoint.samples import generate
from cachepoint.scrub import BATCH_BLOCKS, ScrubProgress, scrub
from cachepoint.store.scrub import load_record
from cachepoint.store.store import Store
from tests.conftest import run_cli, sha256_file
from tests.damage import DAMAGE, Damage
from tests.fleet import LAYER, Fleet, export_digest, publish

IMAGE_SIZE = 4 * 1024 * 1024


def stored_values(store_dir: Path) -> dict[bytes, bytes]:
    """Every stored (id, value), damaged ones included, as they are on disk."""
    with Store.open(store_dir) as store:
        values, error = store.blocks.scan_unchecked(None, 1 << 20)
    assert not error, error
    return dict(values)


def fsck_json(store_dir: Path, code: int) -> dict[str, Any]:
    result = run_cli(store_dir, "fsck", "--json", check=False)
    assert result.code == code, f"fsck exited {result.code}:\n{result.out}\n{result.err}"
    data = result.json()
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(("damage", "kind"), DAMAGE)
def test_scrub_without_a_fleet_reports_the_damaged_block_exits_8_and_changes_no_block(
    store_dir: Path, cli, tmp_path: Path, damage: Damage, kind: str
) -> None:
    image = tmp_path / "disk.img"
    generate(image, IMAGE_SIZE, seed=5)
    cli("ingest", LAYER, image, "--json")
    victim = damage(store_dir)
    before = stored_values(store_dir)

    result = cli("scrub", "--json", check=False)
    assert result.code == 8, f"scrub exited {result.code}:\n{result.out}\n{result.err}"
    report = result.json()
    assert report["ok"] is False and report["complete"] is True
    assert report["blocks_checked"] == len(before)
    assert (report["corrupt_found"], report["healed"], report["still_bad"]) == (1, 0, 1), report
    assert [(b["id"], b["kind"]) for b in report["still_bad_blocks"]] == [(str(BlockId(victim)), kind)]
    assert "no fleet" in report["heal_detail"]

    # Nothing was healed, deleted or rewritten: every stored value is byte for byte what it was.
    assert stored_values(store_dir) == before
    fsck = fsck_json(store_dir, 8)
    assert [p["subject"] for p in fsck["problems"]] == [str(BlockId(victim))]
    # fsck shows the scrub's result, as the store recorded it.
    assert fsck["scrub"] == report

    human = cli("scrub", check=False)
    assert human.code == 8 and str(BlockId(victim)) in human.out and "STILL BAD" in human.out


@pytest.mark.parametrize(("damage", "kind"), DAMAGE)
def test_scrub_with_a_coordinator_fetches_the_damaged_block_again_from_it(
    tmp_path: Path, damage: Damage, kind: str
) -> None:
    admin = tmp_path / "admin"
    image = tmp_path / "disk.img"
    generate(image, IMAGE_SIZE, seed=6)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        publish(admin, coordinator.address, image, "production")  # the admin store holds the version too
        victim = damage(admin)
        fsck_json(admin, 8)

        result = run_cli(admin, "scrub", "--coordinator", coordinator.address, "--json", check=False)
        assert result.code == 0, f"scrub exited {result.code}:\n{result.out}\n{result.err}"
        report = result.json()
        assert isinstance(report, dict)
        assert (report["corrupt_found"], report["healed"], report["still_bad"]) == (1, 1, 0), report
        assert report["healed_blocks"] == [str(BlockId(victim))]
        assert report["healed_from"]["origin"]["blocks"] == 1, report

    assert fsck_json(admin, 0)["scrub"] == report
    assert export_digest(admin, f"{LAYER}@1", tmp_path / "out.img") == sha256_file(image)


def test_an_interrupted_scrub_goes_on_from_where_it_stopped(tmp_path: Path) -> None:
    blocks = [random.Random(seed).randbytes(4096) for seed in range(5 * BATCH_BLOCKS + 7)]
    root = tmp_path / "store"
    with Store.open(root, writable=True, create=True) as store:
        store.blocks.put_many((BlockId.of(b).digest, encode_block(b)) for b in blocks)
        store.blocks.persist()

    async def first_pass(store: Store) -> int:
        stop = asyncio.Event()

        def stop_after_two_batches(now: ScrubProgress) -> None:
            if now.blocks_done >= 2 * BATCH_BLOCKS:
                stop.set()

        result = await scrub(store, progress=stop_after_two_batches, stop=stop)
        assert result.complete is False
        return result.blocks_checked

    with Store.open(root, writable=True) as store:
        stopped_at = asyncio.run(first_pass(store))
    assert stopped_at == 2 * BATCH_BLOCKS
    with Store.open(root) as store:
        record = load_record(store)
    assert record.last is None and record.current is not None
    assert record.current.blocks_checked == stopped_at and record.current.cursor is not None

    seen: list[int] = []
    with Store.open(root, writable=True) as store:
        result = asyncio.run(scrub(store, progress=lambda now: seen.append(now.blocks_done)))
    # The second pass read only what the first had not: its first batch ends one batch further on.
    assert seen[0] == stopped_at + BATCH_BLOCKS
    assert result.complete and result.ok and result.resumed == 1
    assert result.blocks_checked == len(blocks)
    with Store.open(root) as store:
        record = load_record(store)
    assert record.current is None and record.last == result.as_json()


def test_scrub_rates_take_binary_units_and_a_bad_rate_is_refused(store_dir: Path, cli) -> None:
    assert parse_rate("50MiB/s") == 50 * 1024 * 1024
    assert parse_rate("512KiB") == 512 * 1024
    cli("init")
    failed = cli("scrub", "--rate", "fast", check=False)
    assert failed.code == 4 and "rate 'fast'" in failed.err, failed.err
