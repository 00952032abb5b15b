"""Exports never overwrite by surprise and never leave a partial result: `export`, `image export`,
`history get` and `restore-dir`, through the real commands.

A failure is made the way bit rot would make it: a stored block's value is replaced by other
well-formed bytes, so RocksDB's checksums are all valid and only the block's own id can tell (as in
test_fsck_corruption.py). The victim block lies late in the file, so the export has written a good
part of it (and sized it in full) before it fails.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachepoint.atomic import TEMP_PREFIX
from cachepoint.blocks import CODEC_ZSTD
from cachepoint.store.store import Store
from tests.conftest import REPO, cli_env, run_cli, sha256_file
from tests.fleet import Fleet
from tests.history import USER, history, make_version, wait_delivered

BLOCK = 64 * 1024
BLOCKS = 192  # 12 MiB: three 4 MiB write jobs
VICTIM_INDEX = 170  # in the last job
HOLES = range(100, 140)  # never stored, never written: the export must keep them holes
EXIT_INVALID, EXIT_CORRUPT = 4, 8


def block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def write_image(path: Path, seed: int) -> bytes:
    """A sparse image of random blocks; returns the victim block."""
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BLOCK)
        for index in range(BLOCKS):
            if index not in HOLES:
                f.seek(index * BLOCK)
                f.write(block(seed * 1000 + index))
    return block(seed * 1000 + VICTIM_INDEX)


def rot(store: Path, victim: bytes) -> None:
    """Replace a block's stored value with one that cannot be decoded (a zstd codec byte before bytes
    that are no zstd frame): local reads trust RocksDB's checksums and do not hash, so damage a read
    must refuse is damage the decoder sees."""
    digest = hashlib.sha256(victim).digest()
    with Store.open(store, writable=True) as opened:
        assert opened.blocks.raw(digest) is not None, "the victim is not in the store"
        opened.blocks.put_many([(digest, bytes((CODEC_ZSTD,)) + bytes(4) + block(99_999))])
        opened.blocks.persist()


def leftovers(directory: Path) -> list[str]:
    """Temporary names anywhere under ``directory``."""
    return sorted(str(p) for p in directory.rglob(f"{TEMP_PREFIX}*"))


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def images(tmp_path: Path, store: Path) -> dict[str, Path]:
    """os/good@1 exports fine; os/bad@1 has a rotten block (its own: the two share none)."""
    sources = tmp_path / "sources"
    sources.mkdir()
    good, bad = sources / "good.img", sources / "bad.img"
    write_image(good, 1)
    victim = write_image(bad, 2)
    run_cli(store, "ingest", "os/good", good)
    run_cli(store, "ingest", "os/bad", bad)
    rot(store, victim)
    return {"good": good, "bad": bad}


def test_an_export_over_an_existing_file_is_refused_and_force_replaces_it_keeping_holes(
    store: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "disk.img"
    dest.write_bytes(b"my precious data")

    refused = run_cli(store, "export", "os/good", dest, check=False)
    assert refused.code == EXIT_INVALID and str(dest) in refused.err and "--force" in refused.err
    assert dest.read_bytes() == b"my precious data"

    run_cli(store, "export", "os/good", dest, "--force")
    assert sha256_file(dest) == sha256_file(images["good"])
    assert allocated(dest) <= (BLOCKS - len(HOLES)) * BLOCK, "holes were written as data"
    assert sorted(os.listdir(out)) == ["disk.img"]

    # An empty file is a name the user made ready: written without asking.
    empty = out / "empty.img"
    empty.touch()
    run_cli(store, "export", "os/good", empty)
    assert sha256_file(empty) == sha256_file(images["good"])


def test_a_failed_export_leaves_nothing_and_with_force_the_old_file_stays_intact(
    store: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    failed = run_cli(store, "export", "os/bad", out / "new.img", check=False)
    assert failed.code == EXIT_CORRUPT and "corrupt" in failed.err, failed.err
    assert os.listdir(out) == [], "neither the file nor its temporary may stay"

    old = out / "old.img"
    run_cli(store, "export", "os/good", old)
    before = sha256_file(old)
    forced = run_cli(store, "export", "os/bad", old, "--force", check=False)
    assert forced.code == EXIT_CORRUPT
    assert sorted(os.listdir(out)) == ["old.img"] and sha256_file(old) == before

    # Into a directory that did not exist: the directories the export made go too.
    deep = tmp_path / "made" / "by" / "export.img"
    assert run_cli(store, "export", "os/bad", deep, check=False).code == EXIT_CORRUPT
    assert not (tmp_path / "made").exists()


def test_a_symlink_at_dest_is_never_followed_and_a_device_is_never_written(
    store: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.img"
    target.write_bytes(b"someone else's file")
    link = tmp_path / "link.img"
    os.symlink(target, link)

    refused = run_cli(store, "export", "os/good", link, check=False)
    assert refused.code == EXIT_INVALID and "symlink" in refused.err and str(link) in refused.err
    run_cli(store, "export", "os/good", link, "--force")
    assert not link.is_symlink() and sha256_file(link) == sha256_file(images["good"])
    assert target.read_bytes() == b"someone else's file", "the link's target was written through"

    for forced in ((), ("--force",)):
        device = run_cli(store, "export", "os/good", "/dev/null", *forced, check=False)
        assert device.code == EXIT_INVALID and "character device" in device.err


def make_tree(root: Path, seed: int) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "app.conf").write_text("threads=4\n")
    with open(root / "disk.img", "wb") as f:
        f.truncate(BLOCKS * BLOCK)
        for index in range(BLOCKS):
            if index not in HOLES:
                f.seek(index * BLOCK)
                f.write(block(seed * 1000 + index))
    (root / "zz-last.txt").write_text("written after the big file")
    os.symlink("etc/app.conf", root / "config")


def test_a_tree_export_is_refused_over_a_non_empty_directory_replaced_with_force_and_never_partial(
    store: Path, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_tree(good, 3)
    make_tree(bad, 4)
    run_cli(store, "ingest", "app/good", good)
    run_cli(store, "ingest", "app/bad", bad)
    rot(store, block(4 * 1000 + VICTIM_INDEX))
    out = tmp_path / "out"
    out.mkdir()

    failed = run_cli(store, "export", "app/bad", out / "tree", check=False)
    assert failed.code == EXIT_CORRUPT, failed.err
    assert os.listdir(out) == [], "neither the tree nor its temporary directory may stay"

    dest = out / "tree"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    refused = run_cli(store, "export", "app/good", dest, check=False)
    assert refused.code == EXIT_INVALID and str(dest) in refused.err and "not empty" in refused.err
    forced = run_cli(store, "export", "app/bad", dest, "--force", check=False)
    assert forced.code == EXIT_CORRUPT
    assert os.listdir(out) == ["tree"] and os.listdir(dest) == ["keep.txt"], "the old tree must stay whole"

    run_cli(store, "export", "app/good", dest, "--force")
    assert sorted(os.listdir(out)) == ["tree"]
    assert sorted(os.listdir(dest)) == ["config", "disk.img", "etc", "zz-last.txt"]
    assert sha256_file(dest / "disk.img") == sha256_file(good / "disk.img")
    assert allocated(dest / "disk.img") <= (BLOCKS - len(HOLES)) * BLOCK, "holes were written as data"
    assert os.readlink(dest / "config") == "etc/app.conf"


def test_image_export_follows_the_same_rules(store: Path, images: dict[str, Path], tmp_path: Path) -> None:
    run_cli(store, "image", "create", "good-desk", "os/good")
    run_cli(store, "image", "create", "bad-desk", "os/bad")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "desk.img"
    dest.write_bytes(b"yesterday's desk")

    refused = run_cli(store, "image", "export", "good-desk", dest, check=False)
    assert refused.code == EXIT_INVALID and str(dest) in refused.err
    assert dest.read_bytes() == b"yesterday's desk"
    failed = run_cli(store, "image", "export", "bad-desk", dest, "--force", check=False)
    assert failed.code == EXIT_CORRUPT
    assert os.listdir(out) == ["desk.img"] and dest.read_bytes() == b"yesterday's desk"
    assert run_cli(store, "image", "export", "bad-desk", out / "other.img", check=False).code == EXIT_CORRUPT
    assert os.listdir(out) == ["desk.img"]

    run_cli(store, "image", "export", "good-desk", dest, "--force")
    assert sha256_file(dest) == sha256_file(images["good"])


def test_an_export_stopped_by_sigterm_leaves_nothing_behind(store: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as f:  # 256 MiB of distinct blocks: long enough to be caught midway
        for index in range(4096):
            f.write(index.to_bytes(8, "big") * (BLOCK // 8))
    run_cli(store, "ingest", "os/big", big)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachepoint", "export", "os/big", str(out / "big.img")],
        env=cli_env(store),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.skip("the export finished before it could be interrupted (a fast disk)")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = out / "big.img"
    if proc.returncode == -signal.SIGTERM and done.exists() and sha256_file(done) == sha256_file(big):
        pytest.skip("the export completed just before the signal arrived")
    assert proc.returncode != 0 and "interrupted" in err, err
    assert os.listdir(out) == [], "a terminated export must remove its temporary"


def test_a_failed_restore_dir_leaves_no_temporary_files_and_today_s_files_as_they_were(
    store: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    first = {f"Documents/doc{i}.bin": block(500 + i) * 3 for i in range(5)}
    for path, data in first.items():
        (home / path).write_bytes(data)
    run_cli(store, "capture", home, "--user", USER)
    for i, path in enumerate(first):
        (home / path).write_bytes(block(600 + i) * 2)
    today = {path: (home / path).read_bytes() for path in first}
    rot(store, block(503))  # a block only @1's doc3.bin has

    failed = run_cli(store, "restore-dir", home, "--user", USER, "--to", "@1", "--only", "data", check=False)
    assert failed.code == EXIT_CORRUPT, failed.err
    assert leftovers(home) == []
    assert {path: (home / path).read_bytes() for path in first} == today


def test_history_get_refuses_an_existing_file_and_a_failed_transfer_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data = b"".join(block(700 + i) for i in range(48))  # 3 MiB: the failure comes after 2 chunks
    (home / "big.bin").write_bytes(data)
    coordinator_data = tmp_path / "coordinator"
    out = tmp_path / "out"
    out.mkdir()
    with Fleet(tmp_path / "fleet") as fleet:
        coordinator = fleet.coordinator(data=coordinator_data)
        desk = fleet.cachepoint("desk", coordinator.address, subscribe=())
        make_version(desk, home, "one")
        wait_delivered(desk)

        kept = out / "big.bin"
        kept.write_bytes(b"the copy I already had")
        refused = history(coordinator.address, "get", USER, "big.bin", "-o", kept, check=False)
        assert refused.code == EXIT_INVALID and str(kept) in refused.err
        assert kept.read_bytes() == b"the copy I already had"
        history(coordinator.address, "get", USER, "big.bin", "-o", kept, "--force")
        assert kept.read_bytes() == data

        desk.stop()
        coordinator.stop()
        rot(coordinator_data, block(700 + 40))
        coordinator = fleet.coordinator(data=coordinator_data)

        kept.write_bytes(b"the copy I already had")
        failed = history(coordinator.address, "get", USER, "big.bin", "-o", kept, "--force", check=False)
        assert failed.code == EXIT_CORRUPT and "corrupt" in failed.err, failed.err
        assert os.listdir(out) == ["big.bin"] and kept.read_bytes() == b"the copy I already had"
        fresh = history(coordinator.address, "get", USER, "big.bin", "-o", out / "fresh.bin", check=False)
        assert fresh.code == EXIT_CORRUPT
        assert os.listdir(out) == ["big.bin"], "no partial file and no temporary"
