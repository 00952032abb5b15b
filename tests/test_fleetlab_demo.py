"""`make fleet` (python -m fleetlab.demo): the fleet in network namespaces is built, a version fans
out through a shaped WAN, the table is printed, and nothing of it is left behind. A small fleet (one
site of two nodes, an 8 MiB version); the benchmark runs the same code at full size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fleetlab import netns
from tests.conftest import REPO
from tests.netns import skip_unless_possible


def test_the_fleet_demo_fans_a_version_out_and_leaves_no_namespace(tmp_path: Path) -> None:
    skip_unless_possible()
    tag = f"t{os.getpid()}"  # namespaces named after this worker: removed below whatever happens
    done = subprocess.run(
        [sys.executable, "-m", "fleetlab.demo", "--sites", "1", "--nodes", "2", "--size", "8M",
         "--work", str(tmp_path / "work"), "--tag", tag],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr[-4000:]
        rows = re.findall(r"^(s1n\d)\s+1\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+)s$",
                          done.stdout, re.MULTILINE)  # fmt: skip
        assert [name for name, *_ in rows] == ["s1n1", "s1n2"], done.stdout
        assert all(float(seconds) > 0 for *_, seconds in rows), done.stdout
        # Cooperative fetch: the site's WAN carried the version about once, not once per node.
        wan = re.search(r"^site 1: [\d.]+ MiB crossed its WAN \(([\d.]+)x the version's new blocks\)$",
                        done.stdout, re.MULTILINE)  # fmt: skip
        assert wan is not None and float(wan.group(1)) < 1.5, done.stdout
    finally:
        left = netns.remove_tagged(tag)
    assert left == [], f"the demo left namespaces behind: {left}"
