"""Smoke test of the benchmark harness: `python -m bench.run --quick` writes a complete report.

Only the report's shape is checked, never speeds: machines running the tests are too noisy for that.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import RUNS_ENV

REPO = Path(__file__).resolve().parent.parent

SECTIONS = [
    "Machine",
    "Image",
    "Summary",
    "Ceiling: read + SHA-256 + zstd-1, no store",
    "First ingest",
    "Re-ingest of a new version",
    "Clones",
    "Delta sync over gRPC",
    "NBD sequential read",
    "File-level capture: re-capture after 1% of files changed",
    "Real disk image: content-aligned chunks",
    "Read paths on the real disk image: NBD and HTTP",
    "Site fan-out on a fleet in network namespaces",
    "Fan-out at scale (a model)",
    "Coordinator replicas over PostgreSQL",
]
REAL_IMAGE = "Real disk image: content-aligned chunks"
# Left out of a --quick run, saying so: ten fleets of up to 12 daemons in network namespaces take
# minutes (tests/test_site_fanout.py covers the same fleet; `make bench` runs the section).
FLEET = "Site fan-out on a fleet in network namespaces"
# Sections measured in this run: each table must carry numbers in its cells.
# The replicas' section is left out too: 10,000 nodes and 1,000 Watch streams take minutes.
REPLICAS = "Coordinator replicas over PostgreSQL"
MEASURED = [title for title in SECTIONS[3:] if title not in (FLEET, REPLICAS)]
# A table cell holding a number, possibly followed by a unit or ratio sign (e.g. "| 397.1 |", "| 1.254× |").
NUMBER_CELL = re.compile(r"\|\s*\d+(?:\.\d+)?\s*(?:[×%]|[KMG]iB)?\s*(?:\||\()")


def _sections(report: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", report, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.slow
def test_quick_bench_writes_a_full_report(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO,
        # One timed run per figure: repeats run the same code again, and only the report's shape is checked.
        env={**os.environ, RUNS_ENV: "1"},
        capture_output=True,
        text=True,
        # A guard against a hang, not a speed limit: the quick run takes under a minute on an idle
        # machine, and several times that on a busy one (two coordinators, one of them over TLS).
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    report = out.read_text()
    assert report.startswith("# ")
    assert re.search(r"^Date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", report, re.MULTILINE)
    sections = _sections(report)
    for title in SECTIONS:
        assert title in sections, f"missing section {title!r}; have {list(sections)}"
    for title in MEASURED:
        assert NUMBER_CELL.search(sections[title]), f"no numeric figures in section {title!r}"
    # Every acceptance target gets a verdict, in the summary and in its section's table.
    # One verdict per acceptance target: ingest, re-ingest, clones, delta bytes, delta time vs rsync,
    # delta time over mutual TLS vs plaintext, NBD read vs the raw file, re-capture vs first capture;
    # then the real image's (bytes against the ideal, pull time, ingests, exports identical, and casync
    # and rsync where they are installed); then the read paths of the real image (NBD and HTTP).
    real_verdicts = len(re.findall(r"\| (?:PASS|FAIL) \|", sections[REAL_IMAGE]))
    assert real_verdicts >= 4, sections[REAL_IMAGE]
    assert len(re.findall(r"\| (?:PASS|FAIL) \|", sections["Summary"])) == 10 + real_verdicts
    # The TLS pull was measured (an enrolled coordinator and receiver), not reported as not measured.
    delta = sections["Delta sync over gRPC"]
    assert re.search(r"\| `pull\(\)` over mutual TLS, [^|]* \| \d+\.\d+ \(runs ", delta), delta
    # The target's row: the median of the pairs' ratios (plaintext call, then TLS call).
    target = r"\| TLS / plaintext, `pull\(\)` call alone: median of the \d+ pairs' ratios \| "
    ratio = target + r"\d+\.\d+× [^|]*\| [^|]* \| (?:PASS|FAIL) \|"
    assert re.search(ratio, delta), delta
    assert "--quick run leaves it out" in sections[FLEET], sections[FLEET]
    for title in MEASURED[1:-1]:  # the model states no target
        assert re.search(r"\| (?:PASS|FAIL) \|", sections[title]), f"no verdict in section {title!r}"
    assert re.search(r"\d+(?:\.\d+)? MiB/s", sections["Summary"])
    # Progress goes to stderr as the run goes.
    assert "section ceiling" in proc.stderr
    # No leftovers of a temporary report next to the real one.
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
