"""The software timeline of file-level captures, and restore-dir that keeps data: through the real
`cachepoint` command on real directories."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_cli

HOME = "user/alice/home"
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(56) + b"fake editor code"
PE = b"MZ\x90\x00\x03\x00\x00\x00" + b"fake viewer code"
PAST_NS = 1_600_000_000 * 10**9  # well before any capture: never within the "racy" window


def write(path: Path, data: bytes | str, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def capture(store: Path, home: Path) -> dict:
    return run_cli(store, "capture", home, "--user", "alice", "--json").json()  # type: ignore[return-value]


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root: relative path -> bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_home(root: Path) -> Path:
    home = root / "home"
    write(home / "Documents" / "report.txt", "draft 1", PAST_NS)
    write(home / "Documents" / "budget.csv", "a,b\n1,2\n", PAST_NS)
    write(home / ".bashrc", "export EDITOR=vi\n", PAST_NS)
    write(home / "AppData" / "settings.ini", "[ui]\ntheme=light\n", PAST_NS)
    return home


def install_editor(home: Path) -> None:
    """A fake application: a directory with an ELF binary (no extension: found by its magic) and a
    config file."""
    write(home / "Apps" / "Editor" / "editor", ELF, PAST_NS + 1)
    write(home / "Apps" / "Editor" / "editor.conf", "font=mono\n", PAST_NS + 1)


def test_installing_a_fake_application_is_detected_classified_and_labelled(tmp_path):
    store, home = tmp_path / "store", make_home(tmp_path)
    first = capture(store, home)
    assert first["version"] == 1 and first["labels"] == []
    assert first["changes"] == {
        "apps": {"added": 0, "changed": 0, "removed": 0},
        "config": {"added": 2, "changed": 0, "removed": 0},
        "data": {"added": 2, "changed": 0, "removed": 0},
    }

    install_editor(home)
    write(home / "Tools" / "Viewer" / "viewer.exe", PE, PAST_NS + 1)  # a PE binary, by extension and magic
    second = capture(store, home)
    assert second["version"] == 2
    assert second["labels"] == ["app installed: Apps/Editor", "app installed: Tools/Viewer"]
    assert second["changes"]["apps"] == {"added": 2, "changed": 0, "removed": 0}
    assert second["changes"]["config"] == {"added": 1, "changed": 0, "removed": 0}

    log = run_cli(store, "log", HOME, "--json").json()
    newest = log["versions"][0]  # type: ignore[index]
    assert newest["labels"] == second["labels"]
    assert newest["changes"]["apps"]["added"] == 2
    assert "app installed: Apps/Editor" in run_cli(store, "log", HOME).out

    (home / "Tools" / "Viewer" / "viewer.exe").unlink()
    (home / "Tools" / "Viewer").rmdir()
    (home / "Tools").rmdir()
    third = capture(store, home)
    assert third["labels"] == ["app removed: Tools/Viewer"]
    assert third["changes"]["apps"] == {"added": 0, "changed": 0, "removed": 1}


def test_restore_dir_of_apps_and_config_removes_the_app_and_keeps_data_written_after_it(tmp_path):
    store, home = tmp_path / "store", make_home(tmp_path)
    capture(store, home)  # @1: before the install
    install_editor(home)
    capture(store, home)  # @2: the editor is installed
    # Work done after the install: new and changed data, a changed setting.
    write(home / "Documents" / "report.txt", "draft 2, written with the editor", PAST_NS + 2)
    write(home / "Documents" / "letter.txt", "dear bob", PAST_NS + 2)
    write(home / ".bashrc", "export EDITOR=editor\n", PAST_NS + 2)
    capture(store, home)  # @3
    write(home / "Documents" / "notes.txt", "not captured yet", PAST_NS + 3)  # only on disk

    result = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", "@1", "--only", "apps,config", "--json"
    ).json()
    assert result["only"] == ["apps", "config"]  # type: ignore[index]
    assert result["saved_before"] == f"{HOME}@4"  # type: ignore[index]  # today's state, notes.txt included
    assert result["ref"] == f"{HOME}@5"  # type: ignore[index]
    assert result["labels"] == ["app removed: Apps/Editor"]  # type: ignore[index]

    assert not (home / "Apps").exists(), "the application and its directory are gone"
    files = tree(home)
    assert files["Documents/report.txt"] == b"draft 2, written with the editor"
    assert files["Documents/letter.txt"] == b"dear bob"
    assert files["Documents/notes.txt"] == b"not captured yet"
    assert files[".bashrc"] == b"export EDITOR=vi\n", "config is back as it was at @1"
    assert files["AppData/settings.ini"] == b"[ui]\ntheme=light\n"

    # The result is the new latest version, and a capture now finds nothing to do.
    again = capture(store, home)
    assert again["unchanged"] and again["version"] == 5


def test_restore_dir_of_data_brings_data_back_and_keeps_the_apps(tmp_path):
    store, home = tmp_path / "store", make_home(tmp_path)
    capture(store, home)  # @1
    install_editor(home)
    write(home / "Documents" / "report.txt", "draft 2", PAST_NS + 2)
    write(home / "Documents" / "letter.txt", "dear bob", PAST_NS + 2)
    (home / "Documents" / "budget.csv").unlink()
    capture(store, home)  # @2

    result = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", f"{HOME}@1", "--only", "data", "--json"
    ).json()
    assert result["changes"]["data"] == {"added": 1, "changed": 1, "removed": 1}  # type: ignore[index]
    assert result["labels"] == []  # type: ignore[index]
    files = tree(home)
    assert files["Documents/report.txt"] == b"draft 1"
    assert files["Documents/budget.csv"] == b"a,b\n1,2\n"
    assert "Documents/letter.txt" not in files
    assert files["Apps/Editor/editor"] == ELF, "apps stay as they are today"
    assert files["Apps/Editor/editor.conf"] == b"font=mono\n"
    assert os.stat(home / "Documents" / "report.txt").st_mtime_ns == PAST_NS, "mtimes come back too"


def test_restore_dir_refuses_bad_classes_and_refs_with_documented_exit_codes(tmp_path):
    store, home = tmp_path / "store", make_home(tmp_path)
    capture(store, home)
    bad_class = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", "@1", "--only", "games", check=False
    )
    assert bad_class.code == 4 and "apps, config, data" in bad_class.err
    missing = run_cli(
        store, "restore-dir", home, "--user", "alice", "--to", "@9", "--only", "data", check=False
    )
    assert missing.code == 3 and "@9" in missing.err
    other = run_cli(
        store,
        "restore-dir",
        home,
        "--user",
        "alice",
        "--to",
        "user/bob/home@1",
        "--only",
        "data",
        check=False,
    )
    assert other.code == 4
    wrong_layer = run_cli(store, "capture", home, "--user", "alice", "--layer", "user/bob/home", check=False)
    assert wrong_layer.code == 4 and "user/alice/" in wrong_layer.err
    no_dir = run_cli(store, "capture", tmp_path / "absent", "--user", "alice", "--json", check=False)
    assert no_dir.code == 4 and "error" in no_dir.json()  # type: ignore[operator]
