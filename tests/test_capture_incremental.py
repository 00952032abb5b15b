"""Incremental capture: unchanged files are not read again, a changed large file costs only its
changed blocks; and the classification and app-directory rules it relies on."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cachepoint.capture.classify import APPS, CONFIG, DATA, classify, parse_classes
from cachepoint.capture.timeline import app_directory
from cachepoint.model import EntryType
from tests.conftest import run_cli

BLOCK = 64 * 1024
PAST_NS = 1_600_000_000 * 10**9  # files dated well before the capture are never "racy"


def capture(store: Path, home: Path) -> dict:
    return run_cli(store, "capture", home, "--user", "alice", "--json").json()  # type: ignore[return-value]


def write(path: Path, data: bytes, mtime_ns: int = PAST_NS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_recapture_opens_only_the_files_whose_stats_changed(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    for i in range(60):
        write(home / f"dir{i % 6}" / f"file{i:02d}.txt", f"content {i}\n".encode())
    first = capture(store, home)
    assert first["files"] == 60 and first["files_read"] == 60

    write(home / "dir0" / "file00.txt", b"changed content\n", PAST_NS + 5)  # new size and mtime
    write(home / "dir1" / "file01.txt", b"content X\n", PAST_NS)  # same size, same mtime: ctime tells
    second = capture(store, home)
    assert second["version"] == 2
    assert second["files_read"] == 2 and second["files_unchanged"] == 58
    assert second["changes"]["data"] == {"added": 0, "changed": 2, "removed": 0}

    third = capture(store, home)
    assert third["unchanged"] and third["version"] == 2, "nothing changed: no new version"
    assert third["files_read"] == 0 and third["bytes_read"] == 0


def test_a_file_replaced_by_another_with_the_same_size_and_mtime_is_read_again(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    write(home / "a.txt", b"aaaa")
    write(home / "b.txt", b"bbbb")
    capture(store, home)
    # A new file renamed over a.txt: same size and mtime as before, but another inode.
    write(home / "new.tmp", b"AAAA")
    os.replace(home / "new.tmp", home / "a.txt")
    second = capture(store, home)
    assert second["files_read"] == 1
    assert second["changes"]["data"]["changed"] == 1


def test_a_changed_large_file_stores_only_its_changed_blocks(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    rng = random.Random(7)
    blocks = 64
    write(home / "disk.vhdx", rng.randbytes(blocks * BLOCK))
    first = capture(store, home)
    assert first["new_blocks"] == blocks

    with open(home / "disk.vhdx", "r+b") as f:  # rewrite one block in place, as a VM or a database does
        f.seek(17 * BLOCK)
        f.write(rng.randbytes(BLOCK))
    before = run_cli(store, "stats", "--json").json()
    second = capture(store, home)
    assert second["files_read"] == 1 and second["bytes_read"] == blocks * BLOCK
    assert second["new_blocks"] == 1 and second["new_bytes"] == BLOCK
    assert second["reused_blocks"] == blocks - 1, "the other blocks were matched by the pre-filter"
    after = run_cli(store, "stats", "--json").json()
    assert after["blocks"] == before["blocks"] + 1  # type: ignore[index]
    # One raw block (random data does not compress) plus the new manifest (32 bytes per block id).
    grown = after["stored_bytes"] - before["stored_bytes"]  # type: ignore[index]
    assert BLOCK < grown < BLOCK + blocks * 32 + 1024


@pytest.mark.parametrize(
    ("path", "head", "expected"),
    [
        ("Programs/Editor/editor.exe", b"", APPS),
        ("lib/libz.so.1.2.13", b"", APPS),
        ("bin/tool", b"\x7fELF", APPS),
        ("Downloads/setup", b"MZ\x90\x00", APPS),
        ("Apps/Thing.app/Contents/MacOS/Thing", b"\xcf\xfa\xed\xfe", APPS),
        (".local/bin/helper", b"\x7fELF", APPS),  # a binary in a dot directory is still an app
        ("NTUSER.DAT", b"regf", CONFIG),
        ("AppData/Roaming/app/settings.ini", b"[a]", CONFIG),
        ("Library/Preferences/com.x.plist", b"bpli", CONFIG),
        ("export.reg", b"Wind", CONFIG),
        (".bashrc", b"expo", CONFIG),
        (".config/app/state.json", b"{}", CONFIG),
        ("Documents/report.docx", b"PK\x03\x04", DATA),
        ("Documents/so", b"text", DATA),
        ("notes.conf.txt", b"note", DATA),
        ("link-to-binary", None, DATA),
    ],
)
def test_files_are_classified_by_name_then_by_magic(path, head, expected):
    assert classify(path, head) == expected


def test_restore_classes_are_parsed_and_unknown_ones_named():
    assert parse_classes("apps, config") == {"apps", "config"}
    with pytest.raises(ValueError, match="games"):
        parse_classes("apps,games")
    with pytest.raises(ValueError):
        parse_classes(" , ")


def _children(paths: list[tuple[str, EntryType]]) -> dict[str, list[tuple[str, int]]]:
    children: dict[str, list[tuple[str, int]]] = {}
    for path, kind in paths:
        children.setdefault(path.rpartition("/")[0], []).append((path, int(kind)))
    return children


def test_the_app_directory_is_the_topmost_new_directory_without_lone_containers():
    d, f = EntryType.DIRECTORY, EntryType.FILE
    tree = _children(
        [
            ("Programs", d),
            ("Programs/Editor", d),
            ("Programs/Editor/bin", d),
            ("Programs/Editor/bin/editor.exe", f),
            ("Programs/Editor/editor.ini", f),
        ]
    )
    # Programs existed before: the installation created Programs/Editor.
    assert app_directory("Programs/Editor/bin/editor.exe", {"Programs"}, tree) == "Programs/Editor"
    # Programs was created with its only child: it does not name the app.
    assert app_directory("Programs/Editor/bin/editor.exe", set(), tree) == "Programs/Editor"
    # A binary dropped into a directory that existed is named itself.
    existed = {"Programs", "Programs/Editor", "Programs/Editor/bin"}
    assert app_directory("Programs/Editor/bin/editor.exe", existed, tree) == "Programs/Editor/bin/editor.exe"


def test_the_store_inside_the_captured_directory_is_not_captured(tmp_path):
    home = tmp_path / "home"
    store = home / ".local" / "share" / "cachepoint"  # the default place: inside the home directory
    write(home / "notes.txt", b"mine")
    first = capture(store, home)
    paths = [
        e["path"] for e in run_cli(store, "show", "user/alice/home", "--files", "--json").json()["files"]
    ]  # type: ignore[index]
    assert paths == [".local", ".local/share", "notes.txt"]
    assert first["files"] == 1
    again = capture(store, home)  # the store's own writes are not changes of the tree
    assert again["unchanged"]


def test_a_damaged_stat_index_costs_a_full_read_and_never_a_wrong_version(tmp_path):
    from cachepoint.store import format as fmt
    from cachepoint.store.store import Store

    store, home = tmp_path / "store", tmp_path / "home"
    for i in range(5):
        write(home / f"f{i}.txt", f"v1 {i}".encode())
    capture(store, home)
    with Store.open(store, writable=True) as s:
        batch = s.db.batch()
        batch.put(b"user/alice/home", b"\x00\x07garbage", s.db.handle[fmt.CF_CAPTURE_INDEX])
        s.db.write(batch, sync=True)
    write(home / "f0.txt", b"v2 0")
    second = capture(store, home)
    assert second["files_read"] == 5, "without a usable index every file is read"
    assert second["changes"]["data"] == {"added": 0, "changed": 1, "removed": 0}
    assert capture(store, home)["files_read"] == 0, "and the index is good again"
