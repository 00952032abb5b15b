"""Warm sequential read of the composite disk over NBD, against reading the same raw file.

Both sides are whole `qemu-img convert -f raw -O raw SRC OUT` commands, so the client, its start-up
and the output writes are the same and only the source differs: the daemon's NBD export of image
`bench` (v1 as its only layer) or v1.img itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from bench.harness import RUNS, Bench, Check, Section, Table, mib_s, remove, settle, verdict, warm
from bench.ingest_bench import _ingest
from bench.replication_bench import ROOT, _announcement, _run, _sha256, _spawn

LAYER = "os/bench"
IMAGE = "bench"
SHARE = 0.5  # NBD throughput must reach this share of qemu-img's throughput from the raw file
TITLE = "NBD sequential read"
CHECK = f"NBD warm sequential read ≥ {SHARE:.0%} of qemu-img convert of the raw file"
CACHEPOINT = [sys.executable, "-m", "cachepoint"]
METHOD = (
    f"v1 is ingested as `{LAYER}` into a fresh store and image `{IMAGE}` is made of it "
    f"(`cachepoint image create {IMAGE} {LAYER}`); a daemon child (`cachepoint serve --listen 127.0.0.1:0 "
    f"--nbd 127.0.0.1:0 --nbd-socket PATH`, default settings otherwise: a 1 GiB decoded-block cache) "
    f"serves it and `cachepoint attach {IMAGE} --json` gives its read-only NBD URIs (TCP, checked "
    "against the target, and the Unix socket, reported for information). "
    "Each side is the whole command `qemu-img convert -f raw -O raw SRC OUT`, with SRC the NBD URI or "
    "v1.img, and OUT a file in the benchmark's scratch directory, deleted (untimed, followed by "
    f"`os.sync()`) before every run. Per side, one warm-up run, then the best of {RUNS}: the page cache "
    "holds v1.img and the store's files, and the daemon has read the disk once (so its decoded-block "
    "cache holds it: a warm read, as the raw file's is from the page cache). Throughput is the "
    "image's size / wall time, process start-up included on both sides. The NBD copy from the warm-up "
    "is checked once: its SHA-256 must equal v1's. Beside them, for information: `nbdcopy --connections=4 "
    "URI OUT` (libnbd-bin) over TCP, four connections in parallel (read-only exports advertise "
    "multi-conn), measured the same way."
)
NBDCOPY_CONNECTIONS = 4


def _env(store: Path) -> dict[str, str]:
    return dict(os.environ, CACHEPOINT_STORE=str(store))


def _convert_runs(
    bench: Bench, src: str, out: Path, label: str, cmd: list[str] | None = None
) -> tuple[list[float], bytes]:
    """One warm-up copy (whose output's SHA-256 is returned) then RUNS timed ones; ``cmd`` replaces
    qemu-img convert (it must write ``out``)."""
    cmd = cmd or ["qemu-img", "convert", "-f", "raw", "-O", "raw", src, str(out)]
    remove(out)
    _run(cmd, f"{label} (warm-up)")
    digest = _sha256(out)
    times: list[float] = []
    for run in range(RUNS):
        remove(out)
        settle()  # the previous run's output must not be written back on this run's clock
        seconds, _ = _run(cmd, label)
        times.append(seconds)
        bench.log(f"{label}: run {run + 1}/{RUNS} {seconds:.3f} s")
    remove(out)
    return times, digest


def _measure(
    bench: Bench, stack: contextlib.ExitStack
) -> tuple[list[float], list[float], list[float], list[float], bool]:
    v1 = bench.v1
    size = os.path.getsize(v1)
    work = bench.path("nbd")
    remove(work)
    work.mkdir()
    stack.callback(remove, work)  # registered first, so it runs after the daemon is stopped
    store = work / "store"
    bench.log("NBD: building a store holding v1 and image bench")
    _ingest(store, v1, LAYER, create=True)
    env = _env(store)
    _run([*CACHEPOINT, "image", "create", IMAGE, LAYER], "cachepoint image create", env=env, cwd=ROOT)
    out, log, sock = work / "serve.out", work / "serve.log", str(work / "nbd.sock")
    with open(out, "wb") as stdout:
        proc = _spawn(
            stack,
            [
                *CACHEPOINT,
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--nbd",
                "127.0.0.1:0",
                "--nbd-socket",
                str(sock),
            ],
            log,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            env=env,
            cwd=ROOT,
        )
    ready = _announcement(proc, out, log, "cachepoint serve")
    _, attached = _run([*CACHEPOINT, "attach", IMAGE, "--json"], "cachepoint attach", env=env, cwd=ROOT)
    uris = [str(u) for u in json.loads(attached)["nbd_uris"]]
    uri = next(u for u in uris if u.startswith("nbd://"))
    unix_uri = next(u for u in uris if u.startswith("nbd+unix://"))
    bench.log(f"NBD: daemon announced {ready.get('nbd')}, attached as {uri}")
    warm(v1)
    copy = work / "out.img"
    want = _sha256(v1)
    nbd_times, got = _convert_runs(bench, uri, copy, "qemu-img convert from NBD")
    unix_times, got_unix = _convert_runs(bench, unix_uri, copy, "qemu-img convert from NBD (Unix socket)")
    raw_times, _ = _convert_runs(bench, str(v1), copy, "qemu-img convert from v1.img")
    copy_times: list[float] = []
    got_copy = want
    if shutil.which("nbdcopy") is not None:
        nbdcopy = ["nbdcopy", f"--connections={NBDCOPY_CONNECTIONS}", uri, str(copy)]
        label = f"nbdcopy --connections={NBDCOPY_CONNECTIONS} from NBD"
        copy_times, got_copy = _convert_runs(bench, uri, copy, label, nbdcopy)
    else:
        bench.log("NBD: nbdcopy is not installed (package libnbd-bin): not measured")
    bench.log(f"NBD: {mib_s(size, min(nbd_times)):.0f} vs {mib_s(size, min(raw_times)):.0f} MiB/s raw")
    return nbd_times, unix_times, raw_times, copy_times, got == want == got_unix == got_copy


def _failed(why: str, warnings: list[str]) -> Section:
    table = Table(["Measure", "Measured", "Target", "Result"])
    table.add("NBD sequential read", why, f"≥ {SHARE:.0%} of raw", "FAIL")
    return Section(
        key="nbd_read",
        title=TITLE,
        method=METHOD,
        table=table,
        warnings=[*warnings, why],
        checks=[Check(CHECK, why, f"≥ {SHARE:.0%}", False)],
    )


def nbd_read(bench: Bench) -> Section:
    if shutil.which("qemu-img") is None:
        return _failed("not measured: qemu-img is not installed (package qemu-utils)", [])
    try:
        with contextlib.ExitStack() as stack:
            nbd_times, unix_times, raw_times, copy_times, identical = _measure(bench, stack)
    except Exception as err:  # a failed daemon or copy is a result to report, not a reason to lose the rest
        bench.log("NBD read failed:\n" + traceback.format_exc())
        return _failed(f"not measured: {type(err).__name__}: {err}", [])
    size = os.path.getsize(bench.v1)
    nbd, raw = mib_s(size, min(nbd_times)), mib_s(size, min(raw_times))
    share = nbd / raw
    ok = share >= SHARE and identical
    warnings = [] if identical else ["an NBD copy's SHA-256 differs from v1's"]
    table = Table(["Measure", "Measured", "Target", "Result"])
    table.add(f"`qemu-img convert` from NBD, best of {RUNS} (s)", f"{min(nbd_times):.3f}", "", "")
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in nbd_times), "", "")
    table.add(f"… over the Unix socket, best of {RUNS} (s)", f"{min(unix_times):.3f}", "", "")
    table.add(f"`qemu-img convert` from v1.img, best of {RUNS} (s)", f"{min(raw_times):.3f}", "", "")
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in raw_times), "", "")
    table.add("NBD throughput (MiB/s)", f"{nbd:.1f}", f"≥ {SHARE * raw:.1f}", verdict(ok))
    table.add("Raw-file throughput (MiB/s)", f"{raw:.1f}", "", "")
    table.add("NBD / raw file", f"{share:.1%}", f"≥ {SHARE:.0%}", verdict(ok))
    table.add("NBD over the Unix socket / raw file", f"{mib_s(size, min(unix_times)) / raw:.1%}", "", "")
    copied = mib_s(size, min(copy_times)) if copy_times else 0.0
    table.add(
        f"`nbdcopy --connections={NBDCOPY_CONNECTIONS}` from NBD, best of {RUNS} (s)",
        f"{min(copy_times):.3f} ({copied:.1f} MiB/s, {copied / raw:.1%} of raw)"
        if copy_times
        else "not measured: nbdcopy is not installed (package libnbd-bin)",
        "",
        "",
    )
    table.add(
        "SHA-256 of the NBD copies equals v1's", "yes" if identical else "no", "yes", verdict(identical)
    )
    return Section(
        key="nbd_read",
        title=TITLE,
        method=METHOD,
        table=table,
        figures={
            "nbd_mib_s": nbd,
            "unix_mib_s": mib_s(size, min(unix_times)),
            "raw_mib_s": raw,
            "share": share,
            "nbdcopy_mib_s": copied,
        },
        checks=[
            Check(
                CHECK,
                f"{share:.1%} ({nbd:.0f} of {raw:.0f} MiB/s)"
                + ("" if identical else "; the NBD copy differs from v1"),
                f"≥ {SHARE:.0%}",
                ok,
            )
        ],
        warnings=warnings,
    )
