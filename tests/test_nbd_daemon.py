"""Attach, write, snapshot, detach and re-attach through a running `cachepoint serve --nbd`, with qemu
as the client."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import cli_env, daemon, run_cli

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")),
    reason="needs qemu-utils (make test installs it)",
)
BS = 65536


def qemu_io(uri: str, command: str) -> str:
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, (
        proc.stdout + proc.stderr
    )
    return proc.stdout


@pytest.mark.parametrize("chunking", ["fixed", "content"])
def test_a_users_writes_survive_snapshot_detach_and_reattach_while_the_os_layer_stays_as_it_was(
    tmp_path, chunking
):
    store = tmp_path / "store"
    base = tmp_path / "os.img"
    base.write_bytes(os.urandom(32 * BS))
    run_cli(store, "ingest", "os/base", base, "--chunking", chunking)
    run_cli(store, "image", "create", "desk", "os/base")
    with daemon(store, "--nbd", "127.0.0.1:0", "--nbd-socket", str(tmp_path / "nbd.sock")) as ready:
        assert ready["nbd"][0].startswith("127.0.0.1:") and ready["nbd"][1].startswith("unix:")
        read_only = run_cli(store, "attach", "desk", "--json").json()
        assert read_only["read_only"]
        assert (
            subprocess.run(["qemu-img", "compare", "-f", "raw", str(base), read_only["nbd"]]).returncode == 0
        )
        refused = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4096", read_only["nbd"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # qemu sees the export's read-only flag and refuses to open it for writing.
        assert refused.returncode != 0 and "permission denied" in (refused.stdout + refused.stderr).lower()

        user = run_cli(store, "attach", "desk", "--user", "alice", "--json").json()
        assert (
            user["nbd"] == f"nbd://{ready['nbd'][0]}/alice/desk" and user["user_layer"] == "user/alice/desk"
        )
        socket_uri = next(u for u in user["nbd_uris"] if u.startswith("nbd+unix"))
        qemu_io(user["nbd"], "write -P 0xab 100000 70000")  # unaligned, across a block boundary
        qemu_io(socket_uri, "write -z 300000 5000")
        qemu_io(user["nbd"], "discard 655360 65536")
        snap = run_cli(store, "snapshot", "alice/desk", "-m", "after install", "--json").json()
        assert snap["ref"] == "user/alice/desk@1"
        run_cli(store, "detach", "alice/desk")
        again = run_cli(store, "attach", "desk", "--user", "alice", "--json").json()
        qemu_io(again["nbd"], "read -P 0xab 100000 70000")
        qemu_io(again["nbd"], "read -P 0 300000 5000")
        qemu_io(again["nbd"], "read -P 0 655360 65536")
        qemu_io(again["nbd"], f"read -v 0 {4096}")
        # The OS layer is what it was: the read-only export still equals the original image.
        assert (
            subprocess.run(["qemu-img", "compare", "-f", "raw", str(base), read_only["nbd"]]).returncode == 0
        )
        missing = run_cli(store, "detach", "nobody/desk", check=False)
        assert missing.code == 3 and "nobody/desk" in missing.err
    log = run_cli(store, "log", "user/alice/desk", "--json").json()
    assert [v["message"] for v in log["versions"]] == ["after install"]
    assert run_cli(store, "fsck", "--json").json()["ok"]


def test_scheduled_snapshots_freeze_new_writes_of_attached_user_disks(tmp_path):
    from tests.fleet import wait_until

    store = tmp_path / "store"
    (tmp_path / "os.img").write_bytes(os.urandom(8 * BS))
    run_cli(store, "ingest", "os/base", tmp_path / "os.img")
    run_cli(store, "image", "create", "desk", "os/base")
    config = tmp_path / "cachepoint.toml"
    config.write_text('snapshot_every = "1s"\n')
    env = dict(cli_env(store), CACHEPOINT_CONFIG=str(config))
    with daemon(store, "--nbd", "127.0.0.1:0", env=env):
        user = run_cli(store, "attach", "desk", "--user", "alice", "--json").json()
        qemu_io(user["nbd"], "write -P 0x5a 0 65536")

        def snapshots() -> list[str] | None:
            log = run_cli(store, "log", "user/alice/desk", "--json", check=False)
            found = [v["message"] for v in log.json()["versions"]] if log.code == 0 else []
            return found or None

        assert wait_until("a scheduled snapshot", snapshots, 30.0) == ["scheduled snapshot"]


def test_catalog_edits_go_through_the_daemon_that_holds_the_store(tmp_path):
    store = tmp_path / "store"
    for n in (1, 2):
        (tmp_path / f"os{n}.img").write_bytes(os.urandom(4 * BS))
        run_cli(store, "ingest", "os/base", tmp_path / f"os{n}.img")
    with daemon(store, "--nbd", "127.0.0.1:0"):
        created = run_cli(store, "image", "create", "desk", "os/base@2", "--json").json()
        assert created == {"image": "desk", "refs": ["os/base@2"]}
        user = run_cli(store, "attach", "desk", "--user", "alice", "--json").json()
        qemu_io(user["nbd"], "write -P 0x42 0 65536")
        run_cli(store, "snapshot", "alice/desk", "-m", "one")
        qemu_io(user["nbd"], "write -P 0x43 0 65536")
        run_cli(store, "snapshot", "alice/desk", "-m", "two")
        run_cli(store, "detach", "alice/desk")
        rebased = run_cli(store, "rebase", "desk", "--layer", "os/base@1", "--json").json()
        assert rebased["refs"] == ["os/base@1"] and rebased["replaced"] == "os/base@2"
        restored = run_cli(store, "restore", "desk", "--user", "alice", "--to", "user/alice/desk@1", "--json")
        assert restored.json()["restored_from"] == 1
        tagged = run_cli(store, "tag", "os/base@1", "stable", "--json").json()
        assert tagged == {"layer": "os/base", "tag": "stable", "version": 1, "ref": "os/base@1"}
        rolled = run_cli(store, "rollback", "os/base", "--to", "os/base:stable", "--json").json()
        assert rolled["ref"] == "os/base@3" and rolled["restored_from"] == 1
        collected = run_cli(store, "gc", "--json").json()
        assert collected["blocks_removed"] == 0 and collected["blocks_kept"] > 0
        again = run_cli(store, "attach", "desk", "--user", "alice", "--json").json()
        qemu_io(again["nbd"], "read -P 0x42 0 65536")
        base = (tmp_path / "os1.img").read_bytes()
        proc = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", f"read -v {BS} 16", again["nbd"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and base[BS : BS + 4].hex()[:8] in proc.stdout.replace(" ", "")
