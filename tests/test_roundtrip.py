"""Ingest then export, through the real command: bytes, holes, modes, symlinks and mtimes survive."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bench.gen_image import generate, mutate
from tests.conftest import sha256_file as sha256_of


def make_sparse_image(path: Path, size: int) -> None:
    """A sparse file: data at a few offsets, real holes (never written) elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 3 * 65536 + 100, size // 2, size - 5000):
            f.seek(offset)
            f.write(os.urandom(3000) + b"text " * 200)


def test_a_file_exports_with_the_same_sha256_and_its_holes_stay_holes(cli, tmp_path):
    image = tmp_path / "disk.img"
    make_sparse_image(image, 64 << 20)
    out = cli("ingest", "os/test", image, "--json").json()
    assert out["layer"] == "os/test" and out["version"] == 1 and out["digest"].startswith("sha256:")
    assert out["logical_bytes"] == 64 << 20
    assert 0 < out["new_bytes"] < 1 << 20  # only the data blocks, never the holes
    dest = tmp_path / "out.img"
    cli("export", "os/test@1", dest)
    assert sha256_of(dest) == sha256_of(image)
    assert dest.stat().st_blocks * 512 < 2 << 20, "holes were written as data"


def test_a_generated_image_round_trips_and_a_changed_copy_stores_only_its_changes(cli, tmp_path):
    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    generate(v1, 16 << 20, seed=3)
    mutate(v1, v2, 0.05, seed=4)
    first = cli("ingest", "os/gen", v1, "--json").json()
    second = cli("ingest", "os/gen", v2, "--json", "-m", "five percent").json()
    assert second["version"] == 2
    # The xxh3 pre-filter skipped the unchanged blocks: no SHA-256, nothing stored.
    assert second["reused_blocks"] > 0.8 * (first["blocks"] - first["holes"])
    assert second["new_bytes"] <= 0.06 * (16 << 20)
    for ref, source in (("os/gen@1", v1), ("os/gen@2", v2), ("os/gen", v2)):
        dest = tmp_path / f"{ref.replace('/', '_')}.out"
        cli("export", ref, dest)
        assert sha256_of(dest) == sha256_of(source), ref


def make_tree(root: Path) -> None:
    (root / "etc" / "app").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "empty").mkdir()
    (root / "etc" / "app" / "app.conf").write_text("key = value\n")
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(300_000))
    (root / "bin" / "tool").chmod(0o755)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    (root / "zero-length").write_bytes(b"")
    (root / "link-rel").symlink_to("etc/app/app.conf")
    (root / "link-abs").symlink_to("/nonexistent/target")
    (root / "etc").chmod(0o750)
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(path, ns=(1_600_000_000_000_000_000 + i * 1_000_000_123,) * 2, follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_000_000_000,) * 2)


def snapshot(root: Path) -> dict[str, tuple]:
    result = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(path), st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            result[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, sha256_of(path))
    return result


def test_a_directory_tree_round_trips_with_modes_symlinks_and_mtimes(cli, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cli("ingest", "app/tree", src, "-m", "tree")
    dest = tmp_path / "dest"
    cli("export", "app/tree", dest)
    assert snapshot(dest) == snapshot(src)


def test_exporting_a_tree_into_a_non_empty_directory_is_refused(cli, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cli("ingest", "app/tree", src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    run = cli("export", "app/tree", dest, check=False)
    assert run.code == 4 and "not empty" in run.err
    assert (dest / "keep").read_text() == "mine"


def test_diff_names_added_removed_and_changed_files_with_byte_ranges(cli, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    cli("ingest", "app/tree", src)
    with open(src / "bin" / "tool", "r+b") as f:
        f.seek(70_000)
        f.write(b"patched")
    (src / "secret").unlink()
    (src / "new.txt").write_text("new")
    cli("ingest", "app/tree", src)
    diff = cli("diff", "app/tree@1", "app/tree@2", "--json").json()
    assert diff["added"] == ["new.txt"]
    assert diff["removed"] == ["secret"]
    changed = {c["path"]: c for c in diff["changed"]}
    assert changed["bin/tool"]["ranges"] == [[65536, 131072]]
    assert "etc/app/app.conf" not in changed


def test_rollback_makes_a_new_version_with_the_old_content_and_keeps_the_later_ones(cli, tmp_path):
    img = tmp_path / "a.img"
    generate(img, 2 << 20, seed=5)
    first = sha256_of(img)
    cli("ingest", "os/r", img)
    mutate(img, tmp_path / "b.img", 0.3, seed=6)
    cli("ingest", "os/r", tmp_path / "b.img")
    back = cli("rollback", "os/r", "--to", "os/r@1", "--json").json()
    assert back["version"] == 3 and back["restored_from"] == 1
    log = cli("log", "os/r", "--json").json()
    assert [v["version"] for v in log["versions"]] == [3, 2, 1]
    cli("export", "os/r", tmp_path / "out.img")
    assert sha256_of(tmp_path / "out.img") == first


def test_tags_move_and_every_move_is_recorded(cli, tmp_path):
    img = tmp_path / "a.img"
    generate(img, 1 << 20, seed=7)
    cli("ingest", "os/t", img, "--tag", "staging")
    cli("ingest", "os/t", img, "--allow-same")  # the same content: a second version only when asked
    cli("tag", "os/t@1", "production")
    cli("tag", "os/t@2", "production")
    shown = cli("show", "os/t:production", "--json").json()
    assert shown["version"] == 2 and "production" in shown["tags"]
    assert cli("show", "os/t:staging", "--json").json()["version"] == 1
    moves = [m for m in cli("log", "os/t", "--json").json()["tag_history"] if m["tag"] == "production"]
    assert [(m["previous"], m["version"]) for m in moves] == [(None, 1), (1, 2)]
