"""A daemon's rough edges an operator meets first: an NBD socket in a directory that is not there is a
clear error naming it (exit 4), and a daemon serving its store alone (no coordinator) attaches a ref
it holds, not only an image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO, cli_env, daemon, run_cli

BS = 65536


def test_an_nbd_socket_in_a_missing_directory_is_refused_naming_the_directory(tmp_path):
    store = tmp_path / "store"
    run_cli(store, "init")
    socket_path = tmp_path / "missing" / "nbd.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "cachepoint", "serve", "--listen", "127.0.0.1:0", "--nbd-socket", socket_path],
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 4, proc.stderr
    assert f"--nbd-socket {socket_path}: the directory {socket_path.parent} does not exist" in proc.stderr
    assert "internal error" not in proc.stderr


def test_a_daemon_without_a_coordinator_attaches_a_ref_it_holds(tmp_path):
    store = tmp_path / "store"
    base = tmp_path / "os.img"
    base.write_bytes(os.urandom(8 * BS))
    run_cli(store, "ingest", "os/base", base, "--tag", "production")
    with daemon(store, "--nbd-socket", str(tmp_path / "nbd.sock")):
        attached = run_cli(store, "attach", "os/base:production", "--json").json()
        assert attached["read_only"] and attached["export"] == "os/base:production"
        if shutil.which("qemu-img"):  # the bytes too, when qemu-utils is here (make test installs it)
            compare = subprocess.run(["qemu-img", "compare", "-f", "raw", str(base), attached["nbd"]])
            assert compare.returncode == 0
        missing = run_cli(store, "attach", "os/base@9", check=False)
        assert missing.code == 3 and "os/base" in missing.err and "9" in missing.err
        unknown = run_cli(store, "attach", "desk", check=False)
        assert unknown.code == 3 and "image 'desk' does not exist" in unknown.err
