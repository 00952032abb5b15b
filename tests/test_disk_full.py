"""Disk full during an ingest: a clear error, nothing half-visible, and a store that still works.

The store lives on a small tmpfs the test mounts itself, inside a new user and mount namespace
(``unshare -rm``) so no privileges are needed and the mount vanishes with the namespace. Everything
that must see the store runs inside that namespace: a small driver script runs the real `cachepoint`
commands there and prints their results as JSON for the test to check. The source images and the
exported files live outside the tmpfs, on the test's own directory, so only the store fills it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gen_image import generate
from tests.conftest import REPO, cli_env, sha256_file

MiB = 1024 * 1024
TMPFS_SIZE = "40M"
DRIVER_TIMEOUT = 300

# Runs inside the namespace: each step is one real `cachepoint` command; prints [{step, code, out, err}].
DRIVER = """
import json, subprocess, sys
python, steps = sys.argv[1], json.loads(sys.argv[2])
results = []
for name, args in steps:
    proc = subprocess.run([python, "-m", "cachepoint", *args], capture_output=True, text=True, timeout=120)
    results.append({"step": name, "code": proc.returncode, "out": proc.stdout, "err": proc.stderr})
print(json.dumps(results))
"""


def run_in_small_filesystem(mount: Path, store: Path, steps: list[tuple[str, list[str]]], tmp: Path) -> list:
    """Mount a TMPFS_SIZE tmpfs at ``mount`` and run ``steps`` there; skip if that is impossible."""
    mount.mkdir()
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    run_driver = [sys.executable, str(driver), sys.executable, json.dumps(steps)]
    mount_cmd = f"mount -t tmpfs -o size={TMPFS_SIZE} none {shlex.quote(str(mount))}"
    env = cli_env(store)
    if shutil.which("unshare"):
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount_cmd], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            script = f"{mount_cmd} && exec {shlex.join(run_driver)}"
            proc = subprocess.run(
                ["unshare", "-rm", "sh", "-c", script],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=DRIVER_TIMEOUT,
            )
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)
        why = f"unshare -rm cannot mount a tmpfs here: {probe.stderr.strip()}"
    else:
        why = "unshare is not installed"
    if os.geteuid() != 0:
        pytest.skip(f"needs a small filesystem: {why}, and not running as root")
    # Root without user namespaces: mount in this namespace, and always unmount.
    subprocess.run(mount_cmd, shell=True, check=True, timeout=60)
    try:
        proc = subprocess.run(
            run_driver, env=env, cwd=REPO, capture_output=True, text=True, timeout=DRIVER_TIMEOUT
        )
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_full_disk_fails_the_ingest_clearly_and_leaves_the_store_clean(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    store = mount / "store"
    small = tmp_path / "small.img"
    generate(small, 4 * MiB, seed=3)
    small2 = tmp_path / "small2.img"
    generate(small2, 4 * MiB, seed=4)
    # Random data does not compress: 48 MiB of it cannot fit in what is left of 40 MiB.
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(48 * MiB))
    v1_out = tmp_path / "v1-after-failure.img"
    v2_out = tmp_path / "v2.img"

    steps = [
        ("first", ["ingest", "os/x", str(small), "--json"]),
        ("full", ["ingest", "os/x", str(big), "--json"]),
        ("fsck", ["fsck", "--json"]),
        ("log", ["log", "os/x", "--json"]),
        ("export", ["export", "os/x@1", str(v1_out), "--json"]),
        ("gc", ["gc", "--json"]),
        ("fsck-after-gc", ["fsck", "--json"]),
        ("again", ["ingest", "os/x", str(small2), "--json"]),
        ("export-again", ["export", "os/x@2", str(v2_out), "--json"]),
        ("fsck-at-end", ["fsck", "--json"]),
    ]
    results = {r["step"]: r for r in run_in_small_filesystem(mount, store, steps, tmp_path)}

    def ok(step: str) -> dict:
        result = results[step]
        assert result["code"] == 0, f"{step}: exit {result['code']}\n{result['out']}\n{result['err']}"
        return json.loads(result["out"])

    assert ok("first")["version"] == 1

    # The failure says what happened and where: out of space, in this store; exit code 7.
    full = results["full"]
    assert full["code"] == 7, full
    error = json.loads(full["out"])["error"]
    assert error["exit_code"] == 7
    assert str(store) in error["message"] and "space" in error["message"]
    assert str(store) in full["err"] and "space" in full["err"]

    # Nothing of the failed ingest is visible: fsck clean, only v1 listed, v1 intact. (A record of
    # the failed ingest may remain when the disk was too full to delete it; that is not a problem.)
    report = ok("fsck")
    assert report["ok"] and report["problems"] == [] and report["versions"] == 1
    assert [v["ref"] for v in ok("log")["versions"]] == ["os/x@1"]
    ok("export")
    assert sha256_file(v1_out) == sha256_file(small)

    # The store recovers: gc clears what the failure left, and a later ingest commits.
    gc = ok("gc")
    assert gc["interrupted_ingests_cleared"] == len(report["interrupted_ingests"])
    report = ok("fsck-after-gc")
    assert report["ok"] and report["interrupted_ingests"] == [] and report["unreferenced_blocks"] == 0
    assert ok("again")["version"] == 2
    ok("export-again")
    assert sha256_file(v2_out) == sha256_file(small2)
    report = ok("fsck-at-end")
    assert report["ok"] and report["versions"] == 2
