"""Lazy boot: a cachepoint holding none of an image's blocks answers a cold read after fetching only
what that read needs (plus a bounded readahead), and a full copy of the export equals the image."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cachepoint.samples import generate
from tests.conftest import daemon, run_cli, sha256_file
from tests.fleet import Fleet, publish

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")),
    reason="needs qemu-utils (make test installs it)",
)
BS = 65536
READAHEAD = 32  # cachepoint/disk/composite.py READAHEAD_BLOCKS


def test_a_cold_read_fetches_only_what_it_needs_and_a_full_copy_equals_the_image(tmp_path):
    image = tmp_path / "os.img"
    generate(image, 24 * 1024 * 1024, seed=31)
    data = image.read_bytes()
    blocks = [data[i : i + BS] for i in range(0, len(data), BS)]
    first_data = next(i for i, b in enumerate(blocks) if b != bytes(BS))
    stored_blocks = len({b for b in blocks if b != bytes(BS)})
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator()
        publish(tmp_path / "admin", coordinator.address, image, "production")
        store = tmp_path / "blade"
        with daemon(store, "--nbd", "127.0.0.1:0", "--coordinator", coordinator.address):
            attached = run_cli(store, "attach", "os/x:production", "--json").json()
            assert attached["read_only"]

            def fetched() -> int:
                status = run_cli(store, "status", "--json").json()
                return sum(s["blocks"] for s in status["bytes_by_source"].values())

            assert fetched() == 0, "nothing is fetched before the first read"
            read = subprocess.run(
                ["qemu-io", "-r", "-f", "raw", "-c", f"read -v {first_data * BS} 16", attached["nbd"]],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert read.returncode == 0, read.stderr
            cold = fetched()
            assert 1 <= cold <= 1 + READAHEAD < stored_blocks, (cold, stored_blocks)

            # No local version names the fetched blocks yet: a GC (run by the daemon, which holds
            # the store) must keep them while the disk is attached, or the copy below refetches.
            gc = run_cli(store, "gc", "--json").json()
            assert gc["blocks_removed"] == 0, gc

            copy = tmp_path / "copy.raw"
            convert = subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", attached["nbd"], str(copy)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert convert.returncode == 0, convert.stderr
            assert sha256_file(copy) == sha256_file(image)
            assert fetched() == stored_blocks, "each block was fetched once"

            # Pinning makes the version whole here (for offline use): nothing is left to fetch.
            pinned = run_cli(store, "pin", "os/x:production", "--json").json()
            assert pinned["pinned"] == [{"ref": "os/x@1", "fetched_blocks": 0}]
            assert [v["ref"] for v in run_cli(store, "log", "os/x", "--json").json()["versions"]] == [
                "os/x@1"
            ]
