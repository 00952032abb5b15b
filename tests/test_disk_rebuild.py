"""Rollback that keeps the user's data: rebase the OS under a user's disk, restore a user layer."""

from __future__ import annotations

import os

from cachepoint.disk.attach import open_image
from cachepoint.disk.snapshot import snapshot
from cachepoint.store.store import Store
from tests.conftest import run_cli

BS = 65536
BLOCKS = 8


def disk_bytes(store_dir, image: str) -> bytes:
    with Store.open(store_dir) as store:
        disk = open_image(store, image)
        return disk.read_sync(0, disk.size)


def write_user_block(store_dir, image: str, index: int, data: bytes, message: str) -> None:
    """What a user's VM does through NBD, done in-process: write, then snapshot into user/alice/IMAGE."""
    with Store.open(store_dir, writable=True) as store:
        disk = open_image(store, image, user_layer=f"user/alice/{image}", name=f"alice/{image}")
        try:
            disk.write_sync(index * BS, data)
            disk.flush_sync()
            snapshot(store, disk, f"user/alice/{image}", message)
        finally:
            disk.close()


def user_view(store_dir, image: str) -> bytes:
    with Store.open(store_dir, writable=True) as store:
        disk = open_image(store, image, user_layer=f"user/alice/{image}", name=f"alice/{image}")
        try:
            return disk.read_sync(0, disk.size)
        finally:
            disk.close()


def test_rebase_to_an_older_os_keeps_the_users_blocks(tmp_path):
    store = tmp_path / "store"
    old_os, new_os = os.urandom(BLOCKS * BS), os.urandom(BLOCKS * BS)
    (tmp_path / "os1.img").write_bytes(old_os)
    (tmp_path / "os2.img").write_bytes(new_os)
    run_cli(store, "ingest", "os/win", tmp_path / "os1.img")
    run_cli(store, "ingest", "os/win", tmp_path / "os2.img")
    run_cli(store, "image", "create", "desk", "os/win@2")
    mine = os.urandom(BS)
    write_user_block(store, "desk", 3, mine, "my document")
    before = user_view(store, "desk")
    assert before[3 * BS : 4 * BS] == mine and before[:BS] == new_os[:BS]

    out = run_cli(store, "rebase", "desk", "--layer", "os/win@1", "--json").json()
    assert out["refs"] == ["os/win@1"] and out["replaced"] == "os/win@2"
    after = user_view(store, "desk")
    assert after[3 * BS : 4 * BS] == mine, "the user's block is kept"
    expected = bytearray(old_os)
    expected[3 * BS : 4 * BS] = mine
    assert after == bytes(expected), "every other block comes from the older OS"
    assert disk_bytes(store, "desk") == old_os
    missing = run_cli(store, "rebase", "desk", "--layer", "app/none@1", check=False)
    assert missing.code == 3


def test_restore_brings_an_older_user_version_back_and_the_newer_one_stays_listed(tmp_path):
    store = tmp_path / "store"
    base = os.urandom(BLOCKS * BS)
    (tmp_path / "os.img").write_bytes(base)
    run_cli(store, "ingest", "os/win", tmp_path / "os.img")
    run_cli(store, "image", "create", "desk", "os/win")
    first, second = os.urandom(BS), os.urandom(BS)
    write_user_block(store, "desk", 2, first, "monday")
    write_user_block(store, "desk", 2, second, "tuesday")
    assert user_view(store, "desk")[2 * BS : 3 * BS] == second

    restored = run_cli(
        store, "restore", "desk", "--user", "alice", "--to", "user/alice/desk@1", "--json"
    ).json()
    assert restored["version"] == 3 and restored["restored_from"] == 1
    assert user_view(store, "desk")[2 * BS : 3 * BS] == first
    log = run_cli(store, "log", "user/alice/desk", "--json").json()
    assert [v["message"] for v in log["versions"]] == ["restore to user/alice/desk@1", "tuesday", "monday"]
    wrong = run_cli(store, "restore", "desk", "--user", "alice", "--to", "os/win@1", check=False)
    assert wrong.code == 4 and "user/alice/desk" in wrong.err


def test_restore_refuses_while_the_disk_has_unsnapshotted_writes(tmp_path):
    store = tmp_path / "store"
    (tmp_path / "os.img").write_bytes(os.urandom(BLOCKS * BS))
    run_cli(store, "ingest", "os/win", tmp_path / "os.img")
    run_cli(store, "image", "create", "desk", "os/win")
    write_user_block(store, "desk", 1, os.urandom(BS), "saved")
    with Store.open(store, writable=True) as opened:
        disk = open_image(opened, "desk", user_layer="user/alice/desk", name="alice/desk")
        disk.write_sync(5 * BS, os.urandom(BS))
        disk.flush_sync()
        disk.close()
    refused = run_cli(store, "restore", "desk", "--user", "alice", "--to", "user/alice/desk@1", check=False)
    assert refused.code == 4 and "snapshot or discard" in refused.err
