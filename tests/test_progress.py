"""Long commands show progress on a terminal and stay quiet in a pipe or under --json."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from cachepoint.samples import generate
from tests.conftest import REPO, cli_env


def run_on_a_terminal(store, *args: str) -> tuple[int, str]:
    """Run the command with stderr on a pseudo-terminal; return its exit code and what the terminal saw."""
    master, slave = pty.openpty()
    env = dict(cli_env(store), COLUMNS="100", TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachepoint", *args], env=env, stdout=subprocess.PIPE, stderr=slave, cwd=REPO
    )
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    proc.wait(timeout=120)
    return proc.returncode, seen.decode(errors="replace")


def test_ingest_export_and_fsck_draw_progress_bars_on_a_terminal(tmp_path):
    image = tmp_path / "disk.img"
    generate(image, 256 << 20, seed=9)
    store = tmp_path / "store"
    code, terminal = run_on_a_terminal(store, "ingest", "os/p", str(image))
    assert code == 0 and "ingest os/p" in terminal and "%" in terminal
    code, terminal = run_on_a_terminal(store, "export", "os/p", str(tmp_path / "out.img"))
    assert code == 0 and "export os/p@1" in terminal
    code, terminal = run_on_a_terminal(store, "fsck")
    assert code == 0 and "fsck" in terminal


def test_json_output_has_no_progress_even_on_a_terminal(tmp_path):
    image = tmp_path / "disk.img"
    generate(image, 64 << 20, seed=9)
    code, terminal = run_on_a_terminal(tmp_path / "store", "ingest", "os/p", str(image), "--json")
    assert code == 0 and terminal == ""
