"""A store written by an earlier release must stay readable: tests/data holds one of each format."""

from __future__ import annotations

import tarfile
from pathlib import Path

from tests.conftest import REPO, run_cli
from tests.test_roundtrip import sha256_of

FIXTURE = REPO / "tests" / "data" / "store-format-1.tar.gz"
DISK_SHA256 = "6f97057752e4b8a099f6019c893a7899a05565cac4cba03c67a6f88650a661db"


def unpack(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "store"


def test_a_format_1_store_reads_verifies_and_exports(tmp_path):
    store = unpack(tmp_path)
    layers = {row["layer"]: row for row in run_cli(store, "ls", "--json").json()["layers"]}
    assert set(layers) == {"os/fixture", "app/fixture"}
    assert layers["os/fixture"]["tags"]["production"] == 1
    assert run_cli(store, "fsck", "--json").json()["ok"]
    run_cli(store, "export", "os/fixture:production", tmp_path / "disk.img")
    assert sha256_of(tmp_path / "disk.img") == DISK_SHA256
    run_cli(store, "image", "export", "fixture", tmp_path / "tree")
    assert (tmp_path / "tree" / "link").read_text() == "hello v1\n"


def test_a_format_1_store_takes_new_versions(tmp_path):
    store = unpack(tmp_path)
    run_cli(store, "export", "os/fixture", tmp_path / "disk.img")
    with open(tmp_path / "disk.img", "r+b") as f:
        f.write(b"changed")
    out = run_cli(store, "ingest", "os/fixture", tmp_path / "disk.img", "--json").json()
    assert out["version"] == 2 and out["new_blocks"] == 1
    assert run_cli(store, "fsck", "--json").json()["ok"]
