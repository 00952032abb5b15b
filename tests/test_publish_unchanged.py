"""Publishing (or ingesting) content the target tag already names makes no new version: a real
coordinator process, the real `cachepoint publish` and `cachepoint ingest` commands.

"The same content" is the same paths, types, modes, sizes, block ids and symlink targets; mtimes and
a disk image's file name do not count. `--allow-same` makes a version anyway.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.fleet import LAYER, Fleet, cachepoint_cli, cli_json, coordinator_versions, random_image

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)

MIB = 1 << 20


def publish(admin: Path, address: str, path: Path, *extra: str) -> dict:
    return cli_json(admin, "publish", LAYER, path, "--coordinator", address, *extra)


def numbers(address: str, layer: str = LAYER) -> list[int]:
    return [v.number for v in coordinator_versions(address, layer)]


def test_publishing_the_same_image_again_makes_no_version_unless_allowed(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 2 * MIB, seed=1)
    admin = tmp_path / "admin"
    with Fleet(tmp_path / "fleet") as fleet:
        address = fleet.coordinator().address
        first = publish(admin, address, image)
        assert first["version"] == 1 and first["unchanged"] is False

        again = cachepoint_cli(admin, "publish", LAYER, image, "--coordinator", address)
        assert again.out.strip().startswith(f"unchanged: {LAYER}@1 already has this content"), again.out
        same = publish(admin, address, image)
        assert same["unchanged"] is True and same["version"] == 1 and same["ref"] == f"{LAYER}@1"
        assert same["blocks_sent"] == 0
        # A new mtime, or the same bytes under another name, is the same disk.
        os.utime(image, ns=(1_000_000_000, 1_000_000_000))
        renamed = tmp_path / "renamed.img"
        shutil.copyfile(image, renamed)
        assert publish(admin, address, image)["unchanged"] is True
        assert publish(admin, address, renamed)["unchanged"] is True
        # Another publisher's store, which never saw @1, learns it instead of making @2.
        other = publish(tmp_path / "other-admin", address, image)
        assert other["unchanged"] is True and other["version"] == 1
        assert cli_json(tmp_path / "other-admin", "show", LAYER)["version"] == 1
        assert numbers(address) == [1]

        forced = publish(admin, address, image, "--allow-same")
        assert forced["version"] == 2 and forced["unchanged"] is False
        assert numbers(address) == [1, 2]

        # A tag that names nothing yet would move: a new version. Once it names this content, no more.
        tagged = publish(admin, address, image, "--tag", "production")
        assert tagged["version"] == 3 and tagged["unchanged"] is False
        assert publish(admin, address, image, "--tag", "production")["unchanged"] is True
        assert numbers(address) == [1, 2, 3]

        with open(image, "r+b") as f:
            f.seek(MIB + 10)
            f.write(b"patched")
        changed = publish(admin, address, image)
        assert changed["version"] == 4 and changed["unchanged"] is False and changed["blocks_sent"] == 1
        assert numbers(address) == [1, 2, 3, 4]


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(100))
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "README").write_text("the tool\n")
    os.symlink("bin/tool", root / "run")


def test_a_tree_with_only_new_mtimes_is_unchanged_and_a_new_mode_is_a_change(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    admin = tmp_path / "admin"
    with Fleet(tmp_path / "fleet") as fleet:
        address = fleet.coordinator().address
        assert publish(admin, address, tree)["version"] == 1
        for path in (tree / "README", tree / "bin" / "tool", tree / "bin"):
            os.utime(path, ns=(2_000_000_000, 2_000_000_000))
        assert publish(admin, address, tree)["unchanged"] is True
        os.chmod(tree / "bin" / "tool", 0o700)
        assert publish(admin, address, tree)["version"] == 2
        os.unlink(tree / "run")
        os.symlink("README", tree / "run")
        assert publish(admin, address, tree)["version"] == 3
        assert numbers(address) == [1, 2, 3]


def test_ingest_follows_the_same_rule_locally_and_through_the_daemon(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MIB, seed=2)
    store = tmp_path / "store"
    assert cli_json(store, "ingest", LAYER, image)["version"] == 1
    again = cachepoint_cli(store, "ingest", LAYER, image)
    assert again.out.strip().startswith(f"unchanged: {LAYER}@1 already has this content"), again.out
    same = cli_json(store, "ingest", LAYER, image)
    assert same["unchanged"] is True and same["version"] == 1
    assert cli_json(store, "ingest", LAYER, image, "--allow-same")["version"] == 2
    with Fleet(tmp_path / "fleet") as fleet:
        node = fleet.cachepoint("node", None, subscribe=(), store=store)
        through = cli_json(node.store, "ingest", LAYER, image)
        assert through["unchanged"] is True and through["version"] == 2
        assert cli_json(node.store, "ingest", LAYER, image, "--allow-same")["version"] == 3
        with open(image, "r+b") as f:
            f.write(b"changed")
        assert cli_json(node.store, "ingest", LAYER, image)["version"] == 4
        assert [v["version"] for v in cli_json(node.store, "log", LAYER)["versions"]] == [4, 3, 2, 1]
