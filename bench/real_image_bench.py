"""A real disk image: content-aligned chunks against fixed blocks, the 4 KiB ideal, casync and rsync.

v1 is an ext4 file system made by `mke2fs -d` from this machine's own files (a deterministic mix
of /usr/lib and /usr/share up to BENCH_REAL_DATA bytes, default: the run's --size); v2 is a copy
changed by `debugfs -w` as a package upgrade changes it: a few thousand new files, and shared
libraries replaced by new builds (3% of their 4 KiB pages patched; written to new blocks, the rest
of their pages move to new aligned offsets). Both are cached under BENCH_CACHE (default bench/cache/)
between runs.

For each chunking (fixed 64 KiB and content-aligned 16/32/64 KiB on average), v1 then v2 are ingested
into an origin store through the Python API (the ingest's own time), a `cachepoint serve` child serves
it, a receiver pulls v1 (untimed), then v2 once through a byte-counting proxy (the bytes on the wire)
and straight to the origin (whole command, timed, as rsync runs straight to its daemon); the
export of v2 from the receiver must equal v2. The ideal is computed from the images alone: the distinct
non-zero 4 KiB pieces of v2 found nowhere in v1, each compressed as the store compresses (zstd-1,
raw when that does not save). casync (`make`, then `extract --seed=v1` over HTTP from a local aiohttp
server behind the same proxy) and rsync --no-whole-file from a daemon run on the same pair; rsync's runs
take turns with the checked mode's pulls, so that the speed-up compares runs made in the same spell of
this shared machine.

Run alone: ``python -m bench.real_image_bench`` (writes its section into bench/report.md, replacing
the previous one); ``make bench`` runs it as one section of the whole report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    SHORT_RUNS,
    Bench,
    Check,
    MiB,
    Section,
    Table,
    cli_env,
    compacted,
    human_bytes,
    remove,
    settle,
    verdict,
    warm,
)
from bench.replication_bench import (
    CACHEPOINT,
    _announcement,
    _Proxy,
    _rsync_stats,
    _run,
    _spawn,
    start_rsync_daemon,
)
from cachepoint.blocks import encode_block
from cachepoint.chunking import DEFAULT_AVERAGE, ChunkParams
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking
from cachepoint.store.store import Store

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAYER = "os/real"
UNIT = 4096
KiB = 1024
NEW_FILES_SHARE = 0.08  # v2's new files, as a share of v1's data
NEW_FILES_MAX = 3500
NEW_FILE_MAX = 128 * KiB
REPLACED_LIBRARIES = 60
MAX_FILE = 32 * MiB
IMAGE_VERSION = "3"  # bump when v1's recipe changes, so cached images are rebuilt
UPGRADE_VERSION = "3"  # the same for v2's
INGEST_RUNS = SHORT_RUNS  # first ingests of about 2 s per mode, compared with each other
# The checked mode's pulls (about a second, whole commands) and rsync's runs, taking turns: one busy
# spell moved a best of 3 pulls from 0.83 s to 1.13-1.28 s between whole runs of the same code.
PULL_RUNS = SHORT_RUNS
CHOSEN = f"content {DEFAULT_AVERAGE // KiB}K"  # the default these measurements chose (docs/design.md)
IDEAL_LIMIT = 1.15
RSYNC_SPEEDUP = 4.0
INGEST_SLACK = 1.10
REINGEST_SPEEDUP = 3.0


@dataclass(frozen=True, slots=True)
class Mode:
    label: str
    chunking: Chunking
    average: int = 0


MODES = (
    Mode("fixed 64K", Chunking.FIXED),
    Mode("content 16K", Chunking.CONTENT, 16 * KiB),
    Mode("content 32K", Chunking.CONTENT, 32 * KiB),
    Mode("content 64K", Chunking.CONTENT, 64 * KiB),
)


# -- the images ------------------------------------------------------------------------------------


def _files(root: str, skip: str = "") -> list[Path]:
    found = []
    for top, dirs, names in os.walk(root):
        dirs.sort()
        if skip:
            dirs[:] = [d for d in dirs if os.path.join(top, d) != skip]
        for name in sorted(names):
            path = Path(top) / name
            with contextlib.suppress(OSError):
                st = path.lstat()
                if path.is_file() and not path.is_symlink() and 0 < st.st_size <= MAX_FILE:
                    found.append(path)
    return found


def _interleaved() -> list[Path]:
    """Shared libraries, /usr/share and the rest of /usr/lib, taken in turns (each in name order)."""
    libraries = next((str(p) for p in sorted(Path("/usr/lib").glob("*-linux-gnu"))), "")
    lists = [_files(libraries), _files("/usr/share"), _files("/usr/lib", skip=libraries)]
    out: list[Path] = []
    for index in range(max(len(x) for x in lists)):
        out += [x[index] for x in lists if index < len(x)]
    return out


def _upgraded(data: bytes, rng: random.Random) -> bytes:
    """A new build of a library as an upgrade ships it: most 4 KiB pages as they were, a few patched
    (3% of pages get a few changed bytes). debugfs writes it to new blocks, so its unchanged pages move
    to new 4 KiB-aligned offsets: the case fixed 64 KiB blocks cannot follow."""
    out = bytearray(data)
    pages = max(1, len(out) // UNIT)
    for _ in range(max(1, pages * 3 // 100)):
        at = rng.randrange(pages) * UNIT + rng.randrange(UNIT - 16)
        out[at : at + 16] = rng.randbytes(16)
    return bytes(out[: len(data)])


def build_images(cache: Path, data_bytes: int, log: Any) -> tuple[Path, Path]:
    """v1.img and v2.img under ``cache`` (each made once, reused while its recipe and size are the same)."""
    home = cache / f"real-{data_bytes // MiB}M-v{IMAGE_VERSION}"
    v1, v1_done = home / "v1.img", home / "done"
    v2, v2_done = home / f"v2-u{UPGRADE_VERSION}.img", home / f"v2-u{UPGRADE_VERSION}.done"
    if v1_done.exists() and v2_done.exists():
        return v1, v2
    for tool in ("mke2fs", "debugfs"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install e2fsprogs)")
    files = _interleaved()
    chosen: list[Path] = []
    total = 0
    for path in files:
        if total >= data_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not v1_done.exists():
        remove(home)
        home.mkdir(parents=True)
        log(f"real image: v1 from {len(chosen)} files ({human_bytes(total)})")
        tree = home / "tree"
        for path in chosen:
            target = tree / path.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        size_mib = int(total * 1.6 / MiB) + 64
        subprocess.run(
            ["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", str(tree), "-F", str(v1), f"{size_mib}M"],
            check=True,
            timeout=3600,
            capture_output=True,
        )
        shutil.rmtree(tree)
        v1_done.write_text(json.dumps({"files": len(chosen), "data": total}))
    _build_v2(home, v1, v2, files, chosen, total, log)
    v2_done.write_text("")
    return v1, v2


def _build_v2(
    home: Path, v1: Path, v2: Path, files: list[Path], chosen: list[Path], total: int, log: Any
) -> None:
    """debugfs writes the new files and the new libraries into a copy of v1 as dpkg does: a library's
    new build is written beside it (``.dpkg-new``, in free blocks), then renamed over the old one."""
    added_budget = int(total * NEW_FILES_SHARE)
    added, added_total = [], 0
    for path in files[len(chosen) :]:
        if added_total >= added_budget or len(added) >= NEW_FILES_MAX:
            break
        size = path.stat().st_size
        if size <= NEW_FILE_MAX:  # an upgrade installs many small files (docs, locales, modules)
            added.append(path)
            added_total += size
    subprocess.run(["cp", "--sparse=always", str(v1), str(v2)], check=True)
    rng = random.Random(2)
    staging = home / "staging"
    remove(staging)
    staging.mkdir()
    commands: list[str] = []
    made: set[str] = set()
    for path in added:
        rel = "/upgrade" + str(path)
        parts = rel.split("/")[1:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/" + "/".join(parts[:depth])
            if directory not in made:
                made.add(directory)
                commands.append(f'mkdir "{directory}"')
        commands.append(f'write "{path}" "{rel}"')
    libraries = [p for p in chosen if ".so" in p.name and p.stat().st_size > 64 * KiB]
    step = max(1, len(libraries) // REPLACED_LIBRARIES)
    replaced = libraries[::step][:REPLACED_LIBRARIES]
    for number, path in enumerate(replaced):
        new = staging / f"lib{number}"
        new.write_bytes(_upgraded(path.read_bytes(), rng))
        # debugfs's ln and unlink leave link counts alone: the pair moves the new inode's one link.
        commands += [
            f'write "{new}" "{path}.dpkg-new"',
            f'rm "{path}"',
            f'ln "{path}.dpkg-new" "{path}"',
            f'unlink "{path}.dpkg-new"',
        ]
    log(
        f"real image: v2 adds {len(added)} files ({human_bytes(added_total)}) and replaces "
        f"{len(replaced)} libraries ({human_bytes(sum(p.stat().st_size for p in replaced))})"
    )
    script = home / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(v2)], check=True, capture_output=True, timeout=3600
    )
    shutil.rmtree(staging)


def ideal_bytes(v1: Path, v2: Path) -> tuple[int, int, int]:
    """(distinct new non-zero 4 KiB pieces of v2, their raw bytes, their bytes as the store keeps them)."""
    held: set[bytes] = set()
    zero = bytes(UNIT)
    with open(v1, "rb") as f:
        while chunk := f.read(16 * MiB):
            for at in range(0, len(chunk), UNIT):
                held.add(hashlib.sha256(chunk[at : at + UNIT]).digest())
    pieces = raw = stored = 0
    with open(v2, "rb") as f:
        while chunk := f.read(16 * MiB):
            for at in range(0, len(chunk), UNIT):
                piece = chunk[at : at + UNIT]
                if piece == zero[: len(piece)]:
                    continue
                digest = hashlib.sha256(piece).digest()
                if digest in held:
                    continue
                held.add(digest)
                pieces += 1
                raw += len(piece)
                stored += len(encode_block(piece))
    return pieces, raw, stored


# -- the runs --------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: Mode
    first_ingest: float
    reingest: float
    reused: int
    blocks_v2: int
    manifest_bytes: int
    pull_seconds: float  # straight to the origin, best of the runs
    proxied_seconds: float  # the pull through the byte-counting proxy (the wire's figures)
    wire: int
    fetched_blocks: int
    identical: bool
    holder_level0: int  # level-0 files of the store holding v1 after its pull, before it was compacted
    holder_compaction: float  # seconds the compaction of that store took


class RealImage:
    def __init__(self, bench: Bench, stack: contextlib.ExitStack, v1: Path, v2: Path) -> None:
        self.bench, self.stack, self.v1, self.v2 = bench, stack, v1, v2
        self.dir = bench.path("real")
        remove(self.dir)
        self.dir.mkdir(parents=True)
        stack.callback(remove, self.dir)
        self.config_home = self.dir / "xdg-config"
        self.config_home.mkdir()
        self.want = _sha256(v2)

    def env(self, store: Path) -> dict[str, str]:
        return cli_env(store, self.config_home)

    def cachepoint(self, store: Path, *args: str) -> tuple[float, dict[str, Any]]:
        seconds, out = _run([*CACHEPOINT, *args, "--json"], f"cachepoint {args[0]}", env=self.env(store))
        return seconds, json.loads(out)

    def _options(self, mode: Mode) -> IngestOptions:
        if mode.chunking == Chunking.FIXED:
            return IngestOptions(LAYER, chunking=Chunking.FIXED)
        return IngestOptions(LAYER, chunking=Chunking.CONTENT, chunk_params=ChunkParams(UNIT, mode.average))

    def ingest_times(self) -> dict[str, float]:
        """Best of INGEST_RUNS first ingests of v1 per mode, each into a new store. The modes take
        turns, round after round, so that a busy spell of the machine weighs on all of them alike."""
        best = {mode.label: float("inf") for mode in MODES}
        for _ in range(INGEST_RUNS):
            for mode in MODES:
                store_dir = self.dir / "ingest-timing"
                remove(store_dir)
                with Store.open(store_dir, writable=True, create=True) as store:
                    settle()
                    start = time.perf_counter()
                    ingest(store, self.v1, self._options(mode))
                    best[mode.label] = min(best[mode.label], time.perf_counter() - start)
                remove(store_dir)
        self.bench.log("real image, first ingests: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()))
        return best

    def run(
        self, mode: Mode, first: float, repeats: int = 1, between: Callable[[], None] | None = None
    ) -> ModeResult:
        """v1 then v2 into an origin, served; a receiver holding v1 pulls v2. ``repeats``: the re-ingest
        and the pull are each timed that many times, from copies of the stores as they were before
        (v1 alone), and the best is kept, as for the first ingest and rsync. ``between``: run after
        each pull (rsync's runs, which take turns with the pull's)."""
        bench = self.bench
        tag = mode.label.replace(" ", "-")
        base = self.dir / f"origin-v1-{tag}"
        with Store.open(base, writable=True, create=True) as store:
            ingest(store, self.v1, self._options(mode))
        origin = self.dir / f"origin-{tag}"
        reingest = float("inf")
        for _ in range(repeats):
            remove(origin)
            shutil.copytree(base, origin)
            with Store.open(origin, writable=True) as store:
                settle()
                start = time.perf_counter()
                second = ingest(store, self.v2, IngestOptions(LAYER))
                reingest = min(reingest, time.perf_counter() - start)
                assert second.version is not None
                manifest_bytes = len(store.catalog.manifest_bytes(second.version.manifest_digest))
        remove(base)
        out = self.dir / f"serve-{tag}.out"
        with open(out, "wb") as stdout:
            proc = _spawn(
                self.stack,
                [*CACHEPOINT, "serve", "--listen", "127.0.0.1:0"],
                self.dir / f"serve-{tag}.log",
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                env=self.env(origin),
            )
        address = str(_announcement(proc, out, self.dir / f"serve-{tag}.log", "origin daemon")["listening"])
        proxy = _Proxy(self.stack, address, self.dir / f"proxy-{tag}.log")
        holder = self.dir / f"receiver-v1-{tag}"
        self.cachepoint(holder, "pull", f"{LAYER}@1", "--from", address)
        level0, compaction = compacted(holder)
        receiver = self.dir / f"receiver-{tag}"
        # The bytes: a pull through the byte-counting proxy. The time: pulls straight to the origin, as
        # rsync runs straight to its daemon (the proxy, a Python relay on the same two cores, added
        # 0.05-0.1 s to a pull of the real image and nothing to rsync, whose bytes are its own count).
        remove(receiver)
        shutil.copytree(holder, receiver)
        settle()
        before = proxy.counts()
        proxied, result = self.cachepoint(receiver, "pull", f"{LAYER}@2", "--from", proxy.address)
        after = proxy.counts()
        seconds = float("inf")
        for _ in range(repeats):
            remove(receiver)
            shutil.copytree(holder, receiver)
            settle()
            took, timed = self.cachepoint(receiver, "pull", f"{LAYER}@2", "--from", address)
            if timed["fetched_bytes"] != result["fetched_bytes"]:  # the same work, or the time means little
                raise RuntimeError(
                    f"pull fetched {timed['fetched_bytes']} bytes, {result['fetched_bytes']} before"
                )
            seconds = min(seconds, took)
            if between is not None:
                between()
        exported = self.dir / "export.img"
        self.cachepoint(receiver, "export", f"{LAYER}@2", str(exported))
        identical = _sha256(exported) == self.want
        remove(exported)
        proc.terminate()
        proc.wait(30)
        remove(receiver)
        remove(holder)
        remove(origin)
        wire = after["up"] - before["up"] + after["down"] - before["down"]
        bench.log(
            f"real image, {mode.label}: first ingest {first:.2f} s, re-ingest {reingest:.2f} s "
            f"({second.reused} reused), pull {seconds:.2f} s ({proxied:.2f} s through the proxy), "
            f"holder's compaction {compaction:.2f} s ({level0} level-0 files), "
            f"{human_bytes(wire)} on the wire, "
            f"export {'identical' if identical else 'DIFFERS'}"
        )
        return ModeResult(
            mode,
            first,
            reingest,
            second.reused,
            second.blocks,
            manifest_bytes,
            seconds,
            proxied,
            wire,
            int(result["fetched_blocks"]),
            identical,
            level0,
            compaction,
        )

    def casync(self) -> tuple[float, float, int, bool] | str:
        """(make seconds, extract seconds, bytes on the wire, identical) or why it was not measured."""
        if shutil.which("casync") is None:
            return "casync is not installed (`make bench` installs it)"
        castr = self.dir / "castr"
        index = self.dir / "v2.caibx"
        make, _ = _run(["casync", "make", f"--store={castr}", str(index), str(self.v2)], "casync make")
        out = self.dir / "http.out"
        with open(out, "wb") as stdout:
            proc = _spawn(
                self.stack,
                [sys.executable, "-m", "bench.real_image_bench", "http", str(castr)],
                self.dir / "http.log",
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                cwd=ROOT,
            )
        address = str(_announcement(proc, out, self.dir / "http.log", "http server")["listening"])
        proxy = _Proxy(self.stack, address, self.dir / "proxy-casync.log")
        target = self.dir / "casync-v2.img"
        settle()
        before = proxy.counts()
        seconds, _ = _run(
            [
                "casync",
                "extract",
                f"--store=http://{proxy.address}/",
                f"--seed={self.v1}",
                str(index),
                str(target),
            ],
            "casync extract",
        )
        after = proxy.counts()
        identical = _sha256(target) == self.want
        remove(target)
        remove(castr)
        wire = after["up"] - before["up"] + after["down"] - before["down"]
        self.bench.log(f"real image, casync: make {make:.1f} s, extract {seconds:.1f} s, {human_bytes(wire)}")
        return make, seconds, wire, identical

    def rsync(self) -> Rsync | str:
        """An rsync daemon serving v2, for runs interleaved with the pull's (``Rsync.once``), or why
        there is none."""
        if shutil.which("rsync") is None:
            return "rsync is not installed (`make bench` installs it)"
        return Rsync(self)


class Rsync:
    """`rsync --no-whole-file` from a daemon onto a fresh copy of v1, run by run. Its runs take turns
    with the pull's, so that a busy spell of this shared machine weighs on both sides of the ratio
    alike (run one after the other, the two once differed by a third between whole runs)."""

    def __init__(self, ctx: RealImage) -> None:
        self.ctx = ctx
        self.url = start_rsync_daemon(ctx.stack, ctx.dir, ctx.v2, "real")
        self.dst = ctx.dir / "rsync-dst.img"
        self.times: list[float] = []
        self.out = ""

    def once(self) -> None:
        shutil.copyfile(self.ctx.v1, self.dst)
        settle()
        took, self.out = _run(["rsync", "--no-whole-file", "--stats", self.url, str(self.dst)], "rsync")
        self.times.append(took)

    def result(self) -> tuple[float, int, bool]:
        """(best seconds, bytes on the wire, whether the last copy equals v2)."""
        if not self.times:
            self.once()
        stats = _rsync_stats(self.out)
        identical = _sha256(self.dst) == self.ctx.want
        remove(self.dst)
        wire = stats.get("sent", 0) + stats.get("received", 0)
        seconds = min(self.times)
        self.ctx.bench.log(f"real image, rsync: {seconds:.2f} s (runs {self.times}), {human_bytes(wire)}")
        return seconds, wire, identical


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            digest.update(chunk)
    return digest.digest()


def real_image(bench: Bench) -> Section:
    data_bytes = _data_bytes(bench)
    cache = Path(os.environ.get("BENCH_CACHE") or HERE / "cache")
    table = Table(["Measure", "Measured", "Target", "Result"])
    section = Section(
        "real_image",
        "Real disk image: content-aligned chunks",
        (
            f"v1: ext4 made by `mke2fs -d` from this machine's /usr/lib and /usr/share (about "
            f"{human_bytes(data_bytes)} of files); v2: `debugfs -w` adds a few thousand files and replaces "
            f"{REPLACED_LIBRARIES} shared libraries with new builds (cached under BENCH_CACHE). "
            "Per chunking: "
            f"v1 then v2 ingested through the API (first ingest: best of {INGEST_RUNS}, each into a new "
            "store), a `cachepoint serve` child serves the origin, a receiver pulls v1 (its store then "
            "compacted, as a node's is between pulls: the seconds that takes are shown), and from "
            "copies of that store runs "
            "`cachepoint pull os/real@2` once through a byte-counting proxy (the bytes on the wire), "
            "then straight to the origin, as rsync runs straight to its daemon (the time: whole "
            f"commands); its export must equal v2. For {CHOSEN}, the checked mode, the re-ingest and "
            "the pull are each the best of "
            f"{PULL_RUNS} (from copies of the stores holding v1), as rsync is. Ideal: distinct non-zero "
            "4 KiB pieces of v2 that v1 has nowhere, zstd-1 each as "
            "the store keeps them. casync: `make` then `extract --seed=v1.img` from a local aiohttp "
            "server behind the same proxy. rsync: `--no-whole-file` from a daemon onto a copy of v1, "
            f"best of {PULL_RUNS}, each run right after one of the pull's."
        ),
        table,
    )
    with contextlib.ExitStack() as stack:
        v1, v2 = build_images(cache, data_bytes, bench.log)
        warm(v1)
        warm(v2)
        ctx = RealImage(bench, stack, v1, v2)
        pieces, raw, ideal = ideal_bytes(v1, v2)
        table.add(
            "Images (v1 / v2)", f"{human_bytes(v1.stat().st_size)} / {human_bytes(v2.stat().st_size)}", "", ""
        )
        table.add(
            "Ideal: new 4 KiB pieces of v2 / raw / as stored",
            f"{pieces} / {human_bytes(raw)} / {human_bytes(ideal)}",
            "",
            "",
        )
        firsts = ctx.ingest_times()
        rsync_runs = ctx.rsync()
        # The checked mode's re-ingest and pull are the best of PULL_RUNS, as rsync is, whose runs take
        # turns with that pull's.
        results = {
            mode.label: ctx.run(
                mode,
                firsts[mode.label],
                PULL_RUNS if mode.label == CHOSEN else 1,
                rsync_runs.once if mode.label == CHOSEN and isinstance(rsync_runs, Rsync) else None,
            )
            for mode in MODES
        }
        for r in results.values():
            table.add(
                f"`cachepoint pull` v2-given-v1, {r.mode.label}: on the wire / × ideal / time (through "
                "the proxy)",
                f"{human_bytes(r.wire)} / {r.wire / ideal:.2f}× / {r.pull_seconds:.2f} s "
                f"({r.proxied_seconds:.2f} s)",
                "",
                "",
            )
            table.add(
                f"… {r.mode.label}: compaction of the store holding v1 after its pull (s; its level-0 "
                "files before)",
                f"{r.holder_compaction:.2f} ({r.holder_level0})",
                "",
                "",
            )
            table.add(
                f"… {r.mode.label}: first ingest / re-ingest (s); chunks of v2; v2 manifest",
                f"{r.first_ingest:.2f} / {r.reingest:.2f}; {r.blocks_v2} ({r.reused} reused); "
                f"{human_bytes(r.manifest_bytes)}",
                "",
                "",
            )
        chosen, fixed = results[CHOSEN], results["fixed 64K"]
        section.figures.update({"ideal": ideal, "chosen_wire": chosen.wire, "fixed_wire": fixed.wire})
        casync = ctx.casync()
        rsync = rsync_runs.result() if isinstance(rsync_runs, Rsync) else rsync_runs
    checks: list[Check] = []
    ratio = chosen.wire / ideal
    checks.append(
        Check(
            f"real image: pull ({CHOSEN}) / 4 KiB ideal",
            f"{ratio:.2f}×",
            f"≤ {IDEAL_LIMIT}×",
            ratio <= IDEAL_LIMIT,
        )
    )
    if isinstance(casync, tuple):
        make, extract, wire, identical = casync
        table.add(
            "casync make / extract --seed over HTTP (s); on the wire",
            f"{make:.1f} / {extract:.1f}; {human_bytes(wire)} ({wire / ideal:.2f}× ideal)",
            "",
            "",
        )
        checks.append(
            Check(
                "real image: pull bytes < casync's",
                f"{human_bytes(chosen.wire)} vs {human_bytes(wire)}",
                "fewer",
                chosen.wire < wire and identical,
            )
        )
    else:
        section.warnings.append(f"casync not measured: {casync}")
    if isinstance(rsync, tuple):
        seconds, wire, identical = rsync
        table.add(
            "rsync --no-whole-file from a daemon (s); on the wire",
            f"{seconds:.2f}; {human_bytes(wire)} ({wire / ideal:.2f}× ideal)",
            "",
            "",
        )
        speedup = seconds / chosen.pull_seconds
        checks.append(
            Check(
                "real image: pull speed-up over rsync",
                f"{speedup:.1f}×",
                f"≥ {RSYNC_SPEEDUP}×",
                speedup >= RSYNC_SPEEDUP and identical,
            )
        )
    else:
        section.warnings.append(f"rsync not measured: {rsync}")
    slower = chosen.first_ingest / fixed.first_ingest
    checks.append(
        Check(
            "real image: first ingest, content / fixed 64K",
            f"{slower:.2f}×",
            f"≤ {INGEST_SLACK}×",
            slower <= INGEST_SLACK,
        )
    )
    faster = chosen.first_ingest / chosen.reingest
    checks.append(
        Check(
            "real image: re-ingest speed-up over first ingest",
            f"{faster:.1f}×",
            f"≥ {REINGEST_SPEEDUP}×",
            faster >= REINGEST_SPEEDUP,
        )
    )
    same = all(r.identical for r in results.values())
    checks.append(Check("real image: every export of v2 identical", "yes" if same else "no", "yes", same))
    for check in checks:
        table.add(check.name, check.measured, check.target, verdict(check.passed))
    section.checks += checks
    return section


def _data_bytes(bench: Bench) -> int:
    """BENCH_REAL_DATA, else the run's image size (1 GiB by default, 64 MiB with --quick)."""
    from bench.harness import parse_size

    text = os.environ.get("BENCH_REAL_DATA")
    return parse_size(text) if text else bench.size


# -- run alone, and the HTTP server casync reads from --------------------------------------------------

BEGIN, END = "<!-- real-image section: begin -->", "<!-- real-image section: end -->"


def splice(report: Path, section: Section) -> None:
    """Put ``section`` into ``report`` between its markers (appended the first time)."""
    from bench.report import _table

    lines = [BEGIN, f"## {section.title}", "", section.method, "", *_table(section.table), ""]
    lines += [f"> **Warning:** {w}\n" for w in section.warnings]
    lines.append(END)
    text = report.read_text() if report.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + "\n".join(lines) + tail
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    report.write_text(text)


def _serve_http(directory: str) -> None:
    from aiohttp import web

    async def main() -> None:
        app = web.Application()
        app.router.add_static("/", directory)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(json.dumps({"listening": f"127.0.0.1:{port}"}), flush=True)
        await asyncio.Event().wait()

    import asyncio

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_image_bench")
    parser.add_argument("command", nargs="?", default="run", choices=["run", "http"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--out", type=Path, default=HERE / "report.md")
    args = parser.parse_args(argv)
    if args.command == "http":
        _serve_http(args.directory)
        return 0
    (HERE / "work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real-", dir=HERE / "work"))
    try:
        bench = Bench(300 * MiB, work)  # the real image's data unless BENCH_REAL_DATA says otherwise
        section = real_image(bench)
        for check in section.checks:
            bench.log(f"{verdict(check.passed)}: {check.name}: {check.measured} (target {check.target})")
        splice(args.out, section)
    finally:
        remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
