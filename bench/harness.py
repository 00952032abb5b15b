"""What every benchmark section shares: the run's context, its images, helpers and the report model.

A section is a function ``(Bench) -> Section``. It may read figures that earlier sections recorded
(``bench.figure(...)``) and lazily built artefacts (the generated images, a store holding only v1), so
sections stay independent functions while the expensive inputs are made once per run.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.gen_image import BLOCK, generate, mutate
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Best of RUNS for every timed figure: the minimum is the least disturbed by noise. BENCH_RUNS=1 is for
# a smoke run (tests/test_bench_smoke.py), which checks that every section runs and reports, not its
# figures: each extra run only repeats the same code, for minutes.
RUNS_ENV = "BENCH_RUNS"


def _runs() -> int:
    text = os.environ.get(RUNS_ENV) or "3"
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"{RUNS_ENV}={text!r}: write the number of timed runs per figure, 1 or more")
    return int(text)


RUNS = _runs()
# Runs of a comparison between two figures of about a second each, two more than RUNS (5 by default;
# BENCH_RUNS=1, the smoke test's, stays 1): on a shared 2-core machine the same one-second copy took
# 0.38 s and 1.8 s within the hour, and a best of 3 on each side still flipped such a ratio by 10-20%.
# Both sides take turns in every round, so both get as many chances at a quiet moment.
SHORT_RUNS = RUNS + 2 if RUNS > 1 else RUNS
# Turns of such a comparison when even that flipped it: two more again (7 by default). Copies of
# about a second moved by 2-6x from one to the next (a raw-file copy took 0.36 s and 2.5 s in one
# run), and a side whose five copies all fell in busy spells was reported at half its speed; calls of
# 0.2 s, by 10-15% on one quick call. The read paths' rounds and the TLS pull's pairs are this many.
TURNS = SHORT_RUNS + 2 if SHORT_RUNS > 1 else SHORT_RUNS
V1_SEED = 1
V2_SEED = 2
V2_FRACTION = 0.05

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``512MiB`` or plain bytes; binary units, a whole number of 64 KiB blocks."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"size {text!r}: write a number with an optional K/M/G suffix (e.g. 1G, 64M)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    # Images are cut into whole blocks; a ragged tail would make the block counts in the report lie.
    if size <= 0 or size % BLOCK:
        raise ValueError(f"size {text!r}: must be a positive multiple of {BLOCK // KiB} KiB")
    return size


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(self.headers)} columns")
        self.rows.append([str(c) for c in cells])


@dataclass(frozen=True, slots=True)
class Check:
    """One acceptance target, for the report's summary."""

    name: str
    measured: str
    target: str
    passed: bool


@dataclass
class Section:
    key: str  # stable id other sections use to look up figures
    title: str
    method: str
    table: Table
    figures: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # signs that the figures are not to be trusted


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def cli_env(store: Path, config_home: Path) -> dict[str, str]:
    """The environment of a `cachepoint` command a benchmark runs on ``store``: no config of this
    machine's user (its own empty XDG config home), the store named."""
    env = dict(os.environ)
    env.pop("CACHEPOINT_CONFIG", None)
    env["XDG_CONFIG_HOME"] = str(config_home)
    env["CACHEPOINT_STORE"] = str(store)
    return env


def settle() -> None:
    """Write back dirty pages before a timed run, so that the previous run's writes (a store's SST
    files, a generated image) are not flushed on this run's clock."""
    os.sync()


def warm(path: Path) -> None:
    """Read a file once so timed runs measure the work, not the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while chunk := os.pread(fd, 16 * MiB, offset):
            offset += len(chunk)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, size: int, work: Path, quick: bool = False, report_dir: Path | None = None) -> None:
        """``quick``: a smoke run (sections that need minutes or root may say they were not run);
        ``report_dir``: where the report goes, and the plots it links to."""
        self.size = size
        self.work = work
        self.quick = quick
        self.report_dir = report_dir or work
        self.started = time.perf_counter()
        self.sections: dict[str, Section] = {}
        self._v1: Path | None = None
        self._v2: Path | None = None
        self._v1_store: Path | None = None

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    def figure(self, section: str, name: str) -> float:
        """A figure an earlier section measured; a KeyError means the section list is out of order."""
        return self.sections[section].figures[name]

    def path(self, name: str) -> Path:
        return self.work / name

    # -- shared inputs, built on first use -----------------------------------------------------

    @property
    def v1(self) -> Path:
        if self._v1 is None:
            path = self.path("v1.img")
            self.log(f"generating v1: {human_bytes(self.size)}, seed {V1_SEED}")
            generate(path, self.size, V1_SEED)
            self._v1 = path
        return self._v1

    @property
    def v2(self) -> Path:
        if self._v2 is None:
            path = self.path("v2.img")
            self.log(f"generating v2: v1 with {V2_FRACTION:.0%} of blocks rewritten, seed {V2_SEED}")
            mutate(self.v1, path, V2_FRACTION, V2_SEED)
            self._v2 = path
        return self._v2

    @property
    def v1_store(self) -> Path | None:
        """A closed store holding only v1 as layer os/bench, if a section left one behind."""
        return self._v1_store

    def keep_v1_store(self, path: Path) -> None:
        self._v1_store = path


SectionFn = Callable[[Bench], Section]


def compacted(store_dir: Path) -> tuple[int, float]:
    """Compact a store's blocks family: (its level-0 files before, the seconds it took).

    Timed pulls start from copies of a store that holds v1, as a node's store is between pulls: its
    compactions done. Left as the pull of v1 leaves it, such a store held 6 to 11 level-0 files from
    one run to the next; a pull that brought it to RocksDB's trigger (12) then waited before exiting
    while RocksDB rewrote the whole store (keys are random digests, so a level-0 compaction takes the
    whole level below): 1.0-1.7 s on the real image, and the synthetic whole-command pull took
    1.4-3.8 s instead of 0.4-0.6 s, 0.7x rsync. Whether the best of the pulls paid it was luck; its
    cost is reported beside the pulls instead: the seconds this compaction takes."""
    with Store.open(store_dir, writable=True) as store:
        blocks = store.db.cf[fmt.CF_BLOCKS]
        level0 = int(blocks.property_int_value("rocksdb.num-files-at-level0") or 0)
        start = time.perf_counter()
        blocks.compact_range(None, None)
        return level0, time.perf_counter() - start
