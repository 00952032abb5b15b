"""``python -m bench.read_paths``: the two local read paths against their raw-file ceilings.

- NBD: warm sequential read of an image whose data is about twice the daemon's ``read_cache``, so most
  blocks come from the store (RocksDB read and decode) on every pass: whole `qemu-img convert -f raw
  -O raw` commands from the daemon's NBD export and from the raw file.
- HTTP: 1 MiB Range GETs at random 1 MiB-aligned offsets, 8 at a time from one aiohttp client, against
  the daemon's ``/v1/versions/REF/file`` and against aiohttp's ``web.FileResponse`` of the raw file
  (a child process), requests per second.

Run alone it prints one JSON object with every figure, for a generated image. In ``make bench`` the
section ``read_paths`` measures the same on the real ext4 image (bench/real_image_bench.py), and
what an empty node fetches to boot it lazily (bench/lazy_boot.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    TURNS,
    Bench,
    Check,
    GiB,
    MiB,
    Section,
    Table,
    human_bytes,
    parse_size,
    remove,
    settle,
    verdict,
    warm,
)
from bench.ingest_bench import _ingest
from bench.replication_bench import ROOT, _announcement, _await_port, _free_port, _run, _sha256, _spawn
from cachepoint.chunking import DEFAULT_AVERAGE
from cachepoint.layers.ingest import IngestOptions, ingest
from cachepoint.model import Chunking, LayerKind
from cachepoint.samples import generate
from cachepoint.store.store import Store

LAYER = "os/bench"
IMAGE = "bench"
CACHEPOINT = [sys.executable, "-m", "cachepoint"]
RANGE_BYTES = MiB
# Copies of each source before the measured ones: the first fills the daemon's read cache, the second
# reads again what the cache could not keep, which the daemon re-stores in lz4 (hot_codec): after
# them the store is as a disk read over and over leaves it.
WARMUPS = 2
ROUNDS = TURNS  # measured rounds of each comparison (copies of about a second; see harness.TURNS)
NBDCOPY_CONNECTIONS = 4  # nbdcopy's connections to the export at once (read-only exports: multi-conn)
CONTENT_AVERAGE = f"{DEFAULT_AVERAGE // 1024} KiB"  # the content store's chunks: the default average
CONCURRENT = 8
LOOPBACK = "127.0.0.1:0"

FILE_SERVER = """
import sys
from aiohttp import web
path, port = sys.argv[1], int(sys.argv[2])
async def handle(request):
    return web.FileResponse(path)
app = web.Application()
app.router.add_get("/file", handle)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used: on a shared machine, steadier than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nbdcopy(uri: str, out: Path) -> list[float]:
    """``nbdcopy --connections=NBDCOPY_CONNECTIONS`` of the export into a file (multi-conn)."""
    cmd = ["nbdcopy", f"--connections={NBDCOPY_CONNECTIONS}", uri, str(out)]
    times = []
    for label in ("nbdcopy (warm-up)", *["nbdcopy"] * ROUNDS):
        remove(out)
        out.touch()
        settle()
        seconds, _ = _run(cmd, label)
        times.append(seconds)
    return times[1:]


def _converts(
    sources: dict[str, str], out: Path, warmed: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """`qemu-img convert` of each source (label -> NBD URI or file) into ``out``: WARMUPS warm-ups
    each, then ROUNDS rounds in which the sources take turns, so that a busy spell of this shared
    machine weighs on every side of a ratio alike (run one after the other, the ratio once moved by a
    quarter). ``warmed`` is called between the warm-ups and the measured rounds."""
    times: dict[str, list[float]] = {label: [] for label in sources}
    for round_ in range(WARMUPS + ROUNDS):
        if round_ == WARMUPS and warmed is not None:
            warmed()
        for label, src in sources.items():
            remove(out)
            settle()
            seconds, _ = _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", src, str(out)], label)
            if round_ >= WARMUPS:
                times[label].append(seconds)
    return times


async def _ranges(url: str, size: int, requests: int, seed: int) -> float:
    """Requests per second of ``requests`` 1 MiB Range GETs, CONCURRENT at a time, each body read whole."""
    rng = random.Random(seed)
    starts = [rng.randrange(size // RANGE_BYTES) * RANGE_BYTES for _ in range(requests)]
    queue = list(reversed(starts))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENT)) as session:

        async def worker() -> None:
            while queue:
                start = queue.pop()
                headers = {"Range": f"bytes={start}-{start + RANGE_BYTES - 1}"}
                async with session.get(url, headers=headers) as reply:
                    body = await reply.read()
                    if reply.status != 206 or len(body) != RANGE_BYTES:
                        raise RuntimeError(f"{url}: status {reply.status}, {len(body)} bytes")

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENT)))
        return requests / (time.perf_counter() - begin)


def _best_rates(urls: dict[str, str], size: int, requests: int) -> dict[str, list[float]]:
    """Requests per second of each server (label -> URL): a warm-up each, then ROUNDS rounds in which
    they take turns (as ``_converts``), each round the same ranges for all."""
    for url in urls.values():
        asyncio.run(_ranges(url, size, requests, seed=0))
    rates: dict[str, list[float]] = {label: [] for label in urls}
    for run in range(ROUNDS):
        for label, url in urls.items():
            rates[label].append(asyncio.run(_ranges(url, size, requests, seed=run + 1)))
    return rates


def _serve(
    stack: contextlib.ExitStack, work: Path, store: Path, read_cache: int
) -> tuple[subprocess.Popen[bytes], dict[str, Any], str]:
    """A `cachepoint serve` child over ``store`` (NBD, HTTP) with the image attached: the process,
    its announcement and the export's NBD URI."""
    config = store.parent / f"{store.name}.toml"
    config.write_text(f'read_cache = "{read_cache}"\n')
    env = dict(os.environ, CACHEPOINT_STORE=str(store), CACHEPOINT_CONFIG=str(config))
    _run([*CACHEPOINT, "image", "create", IMAGE, LAYER], "image create", env=env, cwd=ROOT)
    out, log = work / f"{store.name}.serve.out", work / f"{store.name}.serve.log"
    with open(out, "wb") as stdout:
        proc = _spawn(
            stack,
            [*CACHEPOINT, "serve", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--http", LOOPBACK],
            log,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            env=env,
            cwd=ROOT,
        )
    ready = _announcement(proc, out, log, "cachepoint serve")
    _, attached = _run([*CACHEPOINT, "attach", IMAGE, "--json"], "attach", env=env, cwd=ROOT)
    return proc, ready, next(u for u in json.loads(attached)["nbd_uris"] if u.startswith("nbd://"))


def _metrics(http: str, *names: str) -> dict[str, float]:
    """The values of counters (names without `cachepoint_` and `_total`) in a daemon's /metrics."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        kind = name.removeprefix("cachepoint_").removesuffix("_total")
        if kind in values and name.endswith("_total"):
            values[kind] = float(value)
    return values


class _DaemonCounts:
    """A serving daemon's CPU seconds and read cache hits and misses (its /metrics) from ``start``,
    and what it re-stored in lz4 before (hot_codec)."""

    def __init__(self, pid: int, http: str) -> None:
        self.pid, self.http = pid, http
        self.cpu, self.hits, self.misses = 0.0, 0.0, 0.0
        self.recoded: dict[str, float] = {}

    def _cache(self) -> tuple[float, float]:
        values = _metrics(self.http, "read_cache_hits", "read_cache_misses")
        return values["read_cache_hits"], values["read_cache_misses"]

    def start(self) -> None:
        self.cpu = _cpu_seconds(self.pid)
        self.hits, self.misses = self._cache()
        self.recoded = _metrics(
            self.http, "recoded_blocks", "recoded_stored_bytes_before", "recoded_stored_bytes_after"
        )

    def per_copy(self) -> tuple[float, float]:
        """CPU seconds per measured copy (ROUNDS of them) and the share of block reads the cache hit."""
        hits, misses = self._cache()
        hits, misses = hits - self.hits, misses - self.misses
        return (_cpu_seconds(self.pid) - self.cpu) / ROUNDS, hits / (hits + misses) if hits + misses else 0.0


def _content_chunked(
    stack: contextlib.ExitStack, work: Path, image: Path, read_cache: int, copy: Path
) -> dict[str, object]:
    """The same NBD copies from a store that cut the image into content chunks (the default average,
    the real-image section's choice), with the same read_cache: chunks of many lengths in the cache."""
    store = work / "store-content"
    remove(store)
    with Store.open(store, writable=True, create=True) as opened:
        options = IngestOptions(LAYER, kind=LayerKind.OS, new_layer_chunking=Chunking.CONTENT)
        ingest(opened, image, options)
    proc, ready, uri = _serve(stack, work, store, read_cache)
    daemon = _DaemonCounts(proc.pid, str(ready["http"]))
    label = "qemu-img from NBD, content chunks"
    seconds = _converts({label: uri}, copy, daemon.start)[label]
    cpu, hit_ratio = daemon.per_copy()
    return {
        "content_nbd_seconds": seconds,
        "content_nbd_daemon_cpu_s_per_copy": cpu,
        "content_nbd_read_cache_hit_ratio": hit_ratio,
    }


def data_bytes(image: Path) -> int:
    """Bytes of the image outside all-zero 64 KiB blocks (those are holes: never stored or cached)."""
    zeros = bytes(64 * 1024)
    total = 0
    with open(image, "rb") as f:
        while block := f.read(len(zeros)):
            total += len(block) if block != zeros[: len(block)] else 0
    return total


def measure(
    work: Path, size: int, requests: int, read_cache: int = 0, http: bool = True
) -> dict[str, object]:
    image = work / "v1.img"
    if not image.exists():
        generate(image, size)
    data = data_bytes(image)
    read_cache = read_cache or data // 2
    with contextlib.ExitStack() as stack:
        store = work / "store"
        remove(store)
        _ingest(store, image, LAYER, create=True)
        proc, ready, uri = _serve(stack, work, store, read_cache)
        warm(image)
        copy = work / "out.img"
        # The daemon's CPU and its cache's hits over the measured copies only (the warm-up fills the
        # cache); the daemon is idle while the raw file is copied.
        daemon = _DaemonCounts(proc.pid, str(ready["http"]))
        converts = _converts(
            {"qemu-img from NBD": uri, "qemu-img from the raw file": str(image)}, copy, daemon.start
        )
        nbd, raw = converts["qemu-img from NBD"], converts["qemu-img from the raw file"]
        nbd_cpu, hit_ratio = daemon.per_copy()
        recoded = daemon.recoded
        before = _cpu_seconds(proc.pid)
        nbdcopy = _nbdcopy(uri, copy) if shutil.which("nbdcopy") else []
        nbdcopy_cpu = (_cpu_seconds(proc.pid) - before) / (ROUNDS + 1) if nbdcopy else None
        _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)], "check copy")
        identical = _sha256(copy) == _sha256(image)
        remove(copy)
        figures: dict[str, object] = {
            "image_bytes": size,
            "data_bytes": data,
            "read_cache": read_cache,
            "nbd_seconds": nbd,
            "raw_seconds": raw,
            "nbd_mib_s": size / MiB / min(nbd),
            "raw_mib_s": size / MiB / min(raw),
            "nbd_share": min(raw) / min(nbd),
            "nbd_daemon_cpu_s_per_copy": nbd_cpu,
            "nbd_read_cache_hit_ratio": hit_ratio,
            "recoded_blocks": recoded["recoded_blocks"],
            "recoded_bytes_before": recoded["recoded_stored_bytes_before"],
            "recoded_bytes_after": recoded["recoded_stored_bytes_after"],
            "data_blocks": data // (64 * 1024),
            "nbdcopy_daemon_cpu_s_per_copy": nbdcopy_cpu,
            "nbdcopy_seconds": nbdcopy,
            "nbdcopy_mib_s": size / MiB / min(nbdcopy) if nbdcopy else None,
            "nbd_copy_identical": identical,
        }
        figures.update(_content_chunked(stack, work, image, read_cache, copy))
        if not http:
            return figures
        port = _free_port()
        server = _spawn(stack, [sys.executable, "-c", FILE_SERVER, str(image), str(port)], work / "files.log")
        _await_port(server, port, work / "files.log", "FileResponse server")
        rates = _best_rates(
            {
                "daemon": f"http://{ready['http']}/v1/versions/os%2Fbench@1/file",
                "FileResponse": f"http://127.0.0.1:{port}/file",
            },
            size,
            requests,
        )
        http_rates, files = rates["daemon"], rates["FileResponse"]
    return {
        **figures,
        "http_req_s": http_rates,
        "file_response_req_s": files,
        "http_share": max(http_rates) / max(files),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.read_paths", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("768M"), help="image size")
    parser.add_argument("--requests", type=int, default=400, help="Range GETs per run")
    parser.add_argument(
        "--read-cache", type=parse_size, default=0, help="the daemon's read_cache (default: half the data)"
    )
    parser.add_argument("--no-http", action="store_true", help="measure the NBD read path only")
    parser.add_argument("--work", type=Path, help="scratch directory (kept; default: a temporary one)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = measure(args.work, args.size, args.requests, args.read_cache, not args.no_http)
    else:
        with tempfile.TemporaryDirectory(prefix="read-paths-") as tmp:
            result = measure(Path(tmp), args.size, args.requests, args.read_cache, not args.no_http)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()


# -- the `make bench` section ---------------------------------------------------------------------------

SHARE = 0.5  # each path must reach this share of its raw-file ceiling
TITLE = "Read paths on the real disk image: NBD and HTTP"
NBD_CHECK = (
    f"real image: NBD warm sequential read, data twice the read cache, ≥ {SHARE:.0%} of qemu-img convert "
    "of the raw file"
)
HTTP_CHECK = f"real image: HTTP 1 MiB random Range GETs (8 at once) ≥ {SHARE:.0%} of aiohttp FileResponse"
FULL_REQUESTS = 400
QUICK_REQUESTS = 64


def read_paths(bench: Bench) -> Section:
    """The two local read paths of the real ext4 image (bench/real_image_bench.py's v1, cached)."""
    from bench import lazy_boot
    from bench.real_image_bench import HERE as BENCH_HERE
    from bench.real_image_bench import _data_bytes, build_images

    requests = FULL_REQUESTS if bench.size >= GiB else QUICK_REQUESTS
    method = (
        "v1 of the real disk image (the section above: ext4 from this machine's system files, cached under "
        "BENCH_CACHE) is ingested into a fresh store and served by a `cachepoint serve` child whose "
        "`read_cache` is half the image's data (its non-zero 64 KiB blocks), so most blocks come from the "
        "store (RocksDB read and decode) on every pass. The daemon runs with its defaults otherwise, "
        '`hot_codec = "lz4"` among them: a block it decodes from zstd a second time is re-stored in '
        "lz4, so after the second pass the blocks the cache cannot keep are read from the store in lz4. "
        "NBD: whole `qemu-img convert -f raw -O raw` commands from the export and from the raw file, "
        f"{WARMUPS} warm-ups of each, then the best of {ROUNDS} rounds in which the two take turns (four "
        "more than for longer figures: a copy takes about a second, and this shared machine's speed "
        "moves by 2-6x from one copy to the next); beside "
        "them, for information, `nbdcopy --connections=4` from the export, the daemon's CPU seconds "
        "per copy (steadier than wall time on a shared machine), its read cache's hit ratio, and the "
        "same copies from a second store that cut the image into content chunks "
        f"({CONTENT_AVERAGE} on average). "
        f"HTTP: {requests} GETs of 1 MiB at "
        f"random 1 MiB-aligned offsets, {CONCURRENT} at a time from one aiohttp client, against the "
        "daemon's `/v1/versions/REF/file` and against aiohttp's `web.FileResponse` of the raw file (a "
        "child process); requests per second, a warm-up of each, then the best of "
        f"{ROUNDS} rounds in which the two take turns. The NBD copy's "
        "SHA-256 must equal the image's. " + lazy_boot.METHOD
    )
    table = Table(["Measure", "Measured", "Target", "Result"])
    section = Section("read_paths", TITLE, method, table)
    v1: Path | None = None
    try:
        cache = Path(os.environ.get("BENCH_CACHE") or BENCH_HERE / "cache")
        v1, _ = build_images(cache, _data_bytes(bench), bench.log)
        work = bench.path("read_paths")
        remove(work)
        work.mkdir()
        try:
            os.link(v1, work / "v1.img")
        except OSError:
            shutil.copyfile(v1, work / "v1.img")
        bench.log(f"read paths: {v1.name}, {requests} Range GETs per run")
        figures = measure(work, os.path.getsize(v1), requests)
        remove(work)
    except Exception as err:  # a failed measurement is a result to report, not a reason to lose the rest
        import traceback

        bench.log("read paths failed:\n" + traceback.format_exc())
        why = f"not measured: {type(err).__name__}: {err}"
        table.add("Read paths", why, f"≥ {SHARE:.0%} of raw", "FAIL")
        section.warnings.append(why)
        section.checks += [
            Check(NBD_CHECK, why, f"≥ {SHARE:.0%}", False),
            Check(HTTP_CHECK, why, f"≥ {SHARE:.0%}", False),
        ]
    else:
        _fill(section, figures)
    if v1 is None:
        table.add("Lazy boot", "not measured: the real image was not built", "", "")
    else:
        section.warnings += lazy_boot.section_rows(bench, table, v1)
    return section


def _fill(section: Section, f: dict[str, Any]) -> None:
    table = section.table
    nbd_share, identical = float(f["nbd_share"]), bool(f["nbd_copy_identical"])
    nbd_ok = nbd_share >= SHARE and identical
    http_share = float(f["http_share"])
    http_ok = http_share >= SHARE
    raw_mib_s = float(f["raw_mib_s"])
    table.add(
        "Image / data (non-zero 64 KiB blocks) / read_cache",
        " / ".join(human_bytes(int(f[k])) for k in ("image_bytes", "data_bytes", "read_cache")),
        "",
        "",
    )
    table.add(f"`qemu-img convert` from NBD, best of {ROUNDS} (s)", f"{min(f['nbd_seconds']):.3f}", "", "")
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in f["nbd_seconds"]), "", "")
    table.add(
        f"`qemu-img convert` from the raw file, best of {ROUNDS} (s)", f"{min(f['raw_seconds']):.3f}", "", ""
    )
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in f["raw_seconds"]), "", "")
    table.add(
        "NBD throughput (MiB/s)",
        f"{float(f['nbd_mib_s']):.1f}",
        f"≥ {SHARE * raw_mib_s:.1f}",
        verdict(nbd_ok),
    )
    table.add("Raw-file throughput (MiB/s)", f"{raw_mib_s:.1f}", "", "")
    table.add("NBD / raw file", f"{nbd_share:.1%}", f"≥ {SHARE:.0%}", verdict(nbd_ok))
    table.add(
        "Daemon CPU per `qemu-img convert` copy (s)", f"{float(f['nbd_daemon_cpu_s_per_copy']):.2f}", "", ""
    )
    table.add(
        "Read cache hits during those copies (share of block reads)",
        f"{float(f['nbd_read_cache_hit_ratio']):.1%}",
        "",
        "",
    )
    before, after = float(f["recoded_bytes_before"]), float(f["recoded_bytes_after"])
    table.add(
        "Blocks re-stored in lz4 during the warm-ups (hot_codec); their stored bytes in zstd → lz4",
        f"{int(f['recoded_blocks'])} of {int(f['data_blocks'])} data blocks; "
        f"{human_bytes(int(before))} → {human_bytes(int(after))}"
        + (f" (+{after / before - 1:.0%})" if before else ""),
        "",
        "",
    )
    content = f["content_nbd_seconds"]
    table.add(
        f"`qemu-img convert` from NBD, content chunks ({CONTENT_AVERAGE} average), best of {ROUNDS} (s)",
        f"{min(content):.3f} ({min(f['raw_seconds']) / min(content):.1%} of raw; daemon CPU "
        f"{float(f['content_nbd_daemon_cpu_s_per_copy']):.2f} s per copy; read cache hits "
        f"{float(f['content_nbd_read_cache_hit_ratio']):.1%})",
        "",
        "",
    )
    if f["nbdcopy_seconds"]:
        copied = float(f["nbdcopy_mib_s"])
        table.add(
            f"`nbdcopy --connections=4` from NBD, best of {ROUNDS} (s)",
            f"{min(f['nbdcopy_seconds']):.3f} ({copied:.1f} MiB/s, {copied / raw_mib_s:.1%} of raw; "
            f"daemon CPU {float(f['nbdcopy_daemon_cpu_s_per_copy']):.2f} s per copy)",
            "",
            "",
        )
    else:
        table.add(
            "`nbdcopy --connections=4` from NBD",
            "not measured: nbdcopy is not installed (libnbd-bin)",
            "",
            "",
        )
    table.add(
        "SHA-256 of the NBD copy equals the image's", "yes" if identical else "no", "yes", verdict(identical)
    )
    http, files = f["http_req_s"], f["file_response_req_s"]
    table.add(f"HTTP Range GETs, daemon, best of {ROUNDS} (req/s)", f"{max(http):.1f}", "", "")
    table.add("… all runs (req/s)", ", ".join(f"{r:.1f}" for r in http), "", "")
    table.add(f"HTTP Range GETs, aiohttp FileResponse, best of {ROUNDS} (req/s)", f"{max(files):.1f}", "", "")
    table.add("… all runs (req/s)", ", ".join(f"{r:.1f}" for r in files), "", "")
    table.add("HTTP daemon / FileResponse", f"{http_share:.1%}", f"≥ {SHARE:.0%}", verdict(http_ok))
    section.figures.update(
        {
            "nbd_share": nbd_share,
            "http_share": http_share,
            "nbd_mib_s": float(f["nbd_mib_s"]),
            "raw_mib_s": raw_mib_s,
        }
    )
    section.checks += [
        Check(
            NBD_CHECK,
            f"{nbd_share:.1%} ({float(f['nbd_mib_s']):.0f} of {raw_mib_s:.0f} MiB/s)"
            + ("" if identical else "; the NBD copy differs from the image"),
            f"≥ {SHARE:.0%}",
            nbd_ok,
        ),
        Check(
            HTTP_CHECK,
            f"{http_share:.1%} ({max(http):.0f} of {max(files):.0f} req/s)",
            f"≥ {SHARE:.0%}",
            http_ok,
        ),
    ]
    if not identical:
        section.warnings.append("the NBD copy's SHA-256 differs from the image's")
