"""Bad input gets a clear error naming the object and the limit, a documented exit code, and loses
nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import rocksdict

from tests.conftest import REPO, cli_env

EXIT_NOT_FOUND, EXIT_INVALID, EXIT_BUSY, EXIT_FORMAT = 3, 4, 5, 6


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(200_000))
    return path


def test_a_missing_path_is_named_and_nothing_is_created(cli, tmp_path):
    run = cli("ingest", "os/x", tmp_path / "nope", check=False)
    assert run.code == EXIT_INVALID
    assert "nope" in run.err and "No such file" in run.err
    assert cli("ls", "--json").json()["layers"] == []


def test_an_unreadable_file_in_a_tree_is_named(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    (tree / "locked").write_text("secret")
    (tree / "locked").chmod(0o000)
    command = [sys.executable, "-m", "cachepoint", "ingest", "app/x", str(tree)]
    if os.geteuid() == 0:
        # Root reads anything through CAP_DAC_OVERRIDE: run the command without it (and without
        # CAP_DAC_READ_SEARCH), so permission bits apply as they do to everyone else.
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    proc = subprocess.run(
        command, env=cli_env(tmp_path / "store"), capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert "locked" in proc.stderr and "Permission denied" in proc.stderr


def test_sockets_and_fifos_are_skipped_and_listed_in_a_warning(cli, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("data")
    os.mkfifo(tree / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    try:
        if os.geteuid() == 0:
            os.mknod(tree / "null", 0o600 | 0o020000, os.makedev(1, 3))
        run = cli("ingest", "app/x", tree, "--json")
    finally:
        sock.close()
    skipped = {s["path"]: s["reason"] for s in run.json()["skipped"]}
    assert skipped["pipe"] == "fifo" and skipped["sock"] == "socket"
    if os.geteuid() == 0:
        assert skipped["null"] == "character device"
    assert "warning: skipped" in run.err and "sock (socket)" in run.err
    files = [f["path"] for f in cli("show", "app/x", "--files", "--json").json()["files"]]
    assert files == ["file"]


@pytest.mark.parametrize("name", ["OS/Win10", "os//x", "/abs", "os/../x", "a b"])
def test_invalid_layer_names_are_refused(cli, image, name):
    run = cli("ingest", name, image, check=False)
    assert run.code == EXIT_INVALID and "invalid layer name" in run.err and repr(name) in run.err


@pytest.mark.parametrize("ref", ["os/x@0", "os/x@one", "os/x:", "os/x:bad tag", "OS/x"])
def test_invalid_refs_are_refused_with_the_forms_that_work(cli, image, ref):
    cli("ingest", "os/x", image)
    run = cli("export", ref, image.parent / "out", check=False)
    assert run.code == EXIT_INVALID and "LAYER@N" in run.err


def test_refs_that_do_not_exist_are_reported_as_not_found(cli, image, tmp_path):
    cli("ingest", "os/x", image)
    for ref, expected in (
        ("os/x@9", "no version 9"),
        ("os/x:prod", "no tag 'prod'"),
        ("os/y", "'os/y' does not"),
    ):
        run = cli("show", ref, "--json", check=False)
        assert run.code == EXIT_NOT_FOUND and expected in run.err
        assert run.json()["error"]["exit_code"] == EXIT_NOT_FOUND


def test_a_block_size_that_is_not_a_power_of_two_is_refused(cli, image):
    run = cli("ingest", "os/x", image, "--block-size", "48K", check=False)
    assert run.code == EXIT_INVALID and "'48K'" in run.err and "power of two" in run.err
    run = cli("ingest", "os/x", image, "--block-size", "8M", check=False)
    assert run.code == EXIT_INVALID and "4M" in run.err


def test_a_layer_keeps_its_block_size(cli, image):
    cli("ingest", "os/x", image, "--block-size", "16K")
    run = cli("ingest", "os/x", image, "--block-size", "64K", check=False)
    assert run.code == EXIT_INVALID and "16384" in run.err
    assert cli("show", "os/x", "--json").json()["block_size"] == 16384
    assert cli("ingest", "os/x", image, "--allow-same", "--json").json()["version"] == 2


def test_a_store_written_by_a_newer_format_is_refused_naming_both_versions(cli, image, store_dir):
    cli("ingest", "os/x", image)
    db = rocksdict.Rdict(str(store_dir / "db"), rocksdict.Options(raw_mode=True))
    db.get_column_family("meta").put(b"format_version", (2).to_bytes(4, "big"))
    db.close()
    for args in (("ls",), ("ingest", "os/x", image)):
        run = cli(*args, check=False)
        assert run.code == EXIT_FORMAT
        assert "format version 2" in run.err and "supports [1]" in run.err and "upgrade" in run.err


def test_a_missing_store_is_reported_for_read_commands(cli, store_dir):
    run = cli("ls", check=False)
    assert run.code == EXIT_NOT_FOUND and str(store_dir) in run.err


HOLDER = """
import sys
from cachepoint.store.store import Store
store = Store.open(sys.argv[1], writable=True)
print("ready", flush=True)
sys.stdin.read()
store.close()
"""


def test_reads_work_while_another_process_writes_and_a_second_writer_is_told_the_store_is_busy(
    cli, image, store_dir, tmp_path
):
    cli("ingest", "os/x", image, "-m", "before the writer opened")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert cli("ls", "--json").json()["layers"][0]["layer"] == "os/x"
        assert cli("log", "os/x", "--json").json()["versions"][0]["message"] == "before the writer opened"
        cli("export", "os/x", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == image.read_bytes()
        assert cli("stats", "--json").json()["versions"] == 1
        busy = cli("ingest", "os/x", image, check=False)
        assert busy.code == EXIT_BUSY and "another process" in busy.err
    finally:
        holder.communicate("", timeout=30)
    assert cli("ingest", "os/x", image, "--allow-same", "--json").json()["version"] == 2
