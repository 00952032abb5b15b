"""repair re-fetches what damage took from the fleet: a block inside a damaged SST file (RocksDB's
repair drops the whole file, and with it every block it held that salvage cannot read back) comes
back from the coordinator, and the version exports byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

from cachepoint.samples import generate
from tests.conftest import run_cli, sha256_file
from tests.damage import flip_in_sst
from tests.fleet import LAYER, Fleet, export_digest, publish

IMAGE_SIZE = 8 << 20


def test_repair_fetches_blocks_lost_with_a_damaged_sst_again_from_the_coordinator(tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    image = tmp_path / "disk.img"
    generate(image, IMAGE_SIZE, seed=21)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        publish(admin, coordinator.address, image, "production")  # the admin store holds the version
        victim = flip_in_sst(admin)

        alone = tmp_path / "alone"
        # Without a fleet, repair says exactly what it lost (exit 8)...
        shutil.copytree(admin, alone)
        lonely = run_cli(alone, "repair", "--json", check=False)
        assert lonely.code == 8, lonely
        lost = lonely.json()["lost_blocks"]  # type: ignore[index]
        assert lost and any(victim.hex() in block for block in lost), lost

        # ...and with one, fetches them again.
        result = run_cli(admin, "repair", "--coordinator", coordinator.address, "--json", check=False)
        assert result.code == 0, f"repair exited {result.code}:\n{result.out}\n{result.err}"
        report = result.json()
        assert report["blocks_bad"] >= 1 and report["blocks_healed"] == report["blocks_bad"], report  # type: ignore[index]
        assert report["lost_blocks"] == [] and report["ok"], report  # type: ignore[index]

    assert run_cli(admin, "fsck", "--json").json()["ok"]  # type: ignore[index]
    assert export_digest(admin, f"{LAYER}@1", tmp_path / "out.img") == sha256_file(image)


def test_a_store_whose_database_is_gone_is_rebuilt_from_its_journal_and_the_fleet(tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    image = tmp_path / "disk.img"
    generate(image, IMAGE_SIZE, seed=22)
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        publish(admin, coordinator.address, image, "production")
        run_cli(admin, "tag", f"{LAYER}@1", "golden", "--json")  # a local tag only the journal remembers
        shutil.rmtree(admin / "db")

        result = run_cli(admin, "repair", "--coordinator", coordinator.address, "--json", check=False)
        assert result.code == 0, f"repair exited {result.code}:\n{result.out}\n{result.err}"
        report = result.json()
        assert report["database"] == "made anew from the catalog journal", report  # type: ignore[index]
        assert report["blocks_healed"] == report["blocks_bad"] > 0 and report["ok"], report  # type: ignore[index]

    assert run_cli(admin, "fsck", "--json").json()["ok"]  # type: ignore[index]
    assert export_digest(admin, f"{LAYER}:golden", tmp_path / "out.img") == sha256_file(image)
