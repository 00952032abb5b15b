"""Path traversal in captured trees: symlinks are kept as symlinks and never followed, a manifest
path with ``..`` or ``/`` is refused, and restore-dir never writes outside its directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachepoint.capture.safedir import SafeDir
from cachepoint.errors import SourceUnreadable, UnsafePath
from cachepoint.layers.ingest import cut_files
from cachepoint.layers.source import SourceFile
from cachepoint.model import EntryType, LayerKind, Manifest
from cachepoint.store.catalog import PendingCommit
from cachepoint.store.store import Store
from cachepoint.v1 import manifest_pb2
from tests.conftest import run_cli

HOME = "user/alice/home"
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(24)


def capture(store: Path, home: Path) -> dict:
    return run_cli(store, "capture", home, "--user", "alice", "--json").json()  # type: ignore[return-value]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def outside_dir(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not alice's")
    return outside


def test_a_symlink_pointing_outside_is_stored_as_a_symlink_and_restored_as_one(tmp_path):
    store, home, outside = tmp_path / "store", tmp_path / "home", outside_dir(tmp_path)
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    os.symlink(outside, home / "elsewhere")  # a directory outside
    os.symlink(outside / "secret.txt", home / "secret-link")  # a file outside, by absolute path
    os.symlink("../outside/secret.txt", home / "relative-link")
    first = capture(store, home)
    assert first["files"] == 1 and first["logical_bytes"] == len("mine"), "nothing outside was read"

    shown = run_cli(store, "show", f"{HOME}@1", "--files", "--json").json()
    entries = {e["path"]: e for e in shown["files"]}  # type: ignore[index]
    assert sorted(entries) == ["elsewhere", "notes.txt", "relative-link", "secret-link"]
    assert entries["elsewhere"]["type"] == "symlink" and entries["elsewhere"]["target"] == str(outside)
    assert entries["relative-link"]["target"] == "../outside/secret.txt"

    for name in ("elsewhere", "secret-link", "relative-link"):
        (home / name).unlink()
    capture(store, home)
    run_cli(store, "restore-dir", home, "--user", "alice", "--to", "@1", "--only", "data")
    assert os.readlink(home / "elsewhere") == str(outside)
    assert os.readlink(home / "relative-link") == "../outside/secret.txt"
    assert listing(outside) == ["secret.txt"] and (outside / "secret.txt").read_text() == "not alice's"


def test_restore_dir_does_not_write_through_a_directory_replaced_by_a_symlink(tmp_path):
    store, home, outside = tmp_path / "store", tmp_path / "home", outside_dir(tmp_path)
    (home / "Apps" / "Editor").mkdir(parents=True)
    (home / "Apps" / "Editor" / "editor").write_bytes(ELF)
    (home / "notes.txt").write_text("mine")
    capture(store, home)
    for path in sorted((home / "Apps").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (home / "Apps").rmdir()
    os.symlink(outside, home / "Apps")  # the app's directory now leads outside

    result = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", "@1", "--only", "apps", "--json"
    ).json()
    assert result["kept_today"] == ["Apps/Editor/editor"]  # type: ignore[index]
    assert listing(outside) == ["secret.txt"], "nothing was written outside the home directory"
    assert os.readlink(home / "Apps") == str(outside)


@pytest.mark.parametrize("bad_path", ["../escaped.txt", "/tmp/cachepoint-escaped.txt", "a/../../escaped.txt"])
def test_restore_dir_refuses_a_manifest_path_that_leaves_the_directory(tmp_path, bad_path):
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    capture(store, home)
    # A version whose manifest names a path outside, as a compromised peer might send one.
    crafted = manifest_pb2.Manifest(
        format=1,
        block_size=64 * 1024,
        entries=[manifest_pb2.FileEntry(path=bad_path, type=EntryType.FILE, mode=0o644, size=0)],
    ).SerializeToString(deterministic=True)
    with Store.open(store, writable=True) as s:
        s.catalog.commit(
            layer=HOME,
            kind=LayerKind.USER,
            pending=PendingCommit(crafted, {}),
            manifest=Manifest(64 * 1024, False, ()),
            author="mallory",
            device="elsewhere",
            message="crafted",
        )
    run_cli(store, "rollback", HOME, "--to", f"{HOME}@1")  # @3: a sound latest version again

    refused = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", "@2", "--only", "data", check=False
    )
    assert refused.code == 4, refused.err
    assert bad_path in refused.err
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/cachepoint-escaped.txt").exists()
    assert listing(home) == ["notes.txt"]


def test_safe_dir_never_follows_a_symlink_on_the_way_to_what_it_writes(tmp_path):
    root, outside = tmp_path / "root", outside_dir(tmp_path)
    root.mkdir()
    os.symlink(outside, root / "link")
    with SafeDir(root) as tree:
        with pytest.raises(UnsafePath, match="symlink"):
            tree.create_temp("link/new.txt")
        with pytest.raises(UnsafePath):
            tree.mkdir("link/sub")
        with pytest.raises(ValueError):
            tree.create_temp("../new.txt")
        tree.symlink("link", "/somewhere/else", 0)  # replaces the symlink itself, never its target
    assert os.readlink(root / "link") == "/somewhere/else"
    assert listing(outside) == ["secret.txt"]


def test_a_file_replaced_between_the_walk_and_the_read_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "a.txt").write_text("walked")
    st = os.stat(home / "a.txt")
    (tmp_path / "other.txt").write_text("swapped in")
    os.replace(tmp_path / "other.txt", home / "a.txt")  # another inode at the walked path
    walked = [SourceFile(0, str(home / "a.txt"), st.st_size, (st.st_ino, st.st_dev))]
    with Store.open(tmp_path / "store", writable=True, create=True) as store:
        with pytest.raises(SourceUnreadable, match="replaced"):
            cut_files(store, HOME, walked, lambda _: "a.txt", lambda _: None, b"", 64 * 1024)
