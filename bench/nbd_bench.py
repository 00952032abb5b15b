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

from bench.harness import Bench, Check, Section, Table, mib_s, remove, verdict, warm
from bench.ingest_bench import _ingest
from bench.read_paths import NBDCOPY_CONNECTIONS, ROUNDS, WARMUPS, _converts, _nbdcopy
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
    "`os.sync()`) before every run. First one NBD copy whose SHA-256 must equal v1's (it also fills "
    "the daemon's decoded-block cache: the reads after it are warm, as the raw file's are from the "
    f"page cache), then {WARMUPS} warm-ups of each source and the best of {ROUNDS} rounds in which "
    "the three sources (NBD over TCP, NBD over the Unix socket, v1.img) take turns, so that a busy "
    "spell of this shared machine weighs on both sides of the ratio alike (measured one side after "
    "the other, the same code gave 46% in one run and 94% in another). Throughput is the image's "
    "size / wall time, process start-up included on both sides. Beside them, for information: "
    "`nbdcopy --connections=4 URI OUT` (libnbd-bin) over TCP, four connections in parallel "
    "(read-only exports advertise multi-conn), a warm-up then the best of "
    f"{ROUNDS}, its copy's SHA-256 checked too."
)


def _env(store: Path) -> dict[str, str]:
    return dict(os.environ, CACHEPOINT_STORE=str(store))


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
    remove(copy)
    checked = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)]
    _run(checked, "qemu-img convert from NBD (checked)")
    identical = _sha256(copy) == want
    sources = {"nbd": uri, "unix": unix_uri, "raw": str(v1)}
    times = _converts(sources, copy)
    for label, runs in times.items():
        bench.log(f"NBD: {label}: {', '.join(f'{t:.3f}' for t in runs)} s")
    copy_times: list[float] = []
    if shutil.which("nbdcopy") is not None:
        copy_times = _nbdcopy(uri, copy)
        identical = identical and _sha256(copy) == want
    else:
        bench.log("NBD: nbdcopy is not installed (package libnbd-bin): not measured")
    remove(copy)
    nbd_times, unix_times, raw_times = times["nbd"], times["unix"], times["raw"]
    bench.log(f"NBD: {mib_s(size, min(nbd_times)):.0f} vs {mib_s(size, min(raw_times)):.0f} MiB/s raw")
    return nbd_times, unix_times, raw_times, copy_times, identical


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
    table.add(f"`qemu-img convert` from NBD, best of {ROUNDS} (s)", f"{min(nbd_times):.3f}", "", "")
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in nbd_times), "", "")
    table.add(f"… over the Unix socket, best of {ROUNDS} (s)", f"{min(unix_times):.3f}", "", "")
    table.add(f"`qemu-img convert` from v1.img, best of {ROUNDS} (s)", f"{min(raw_times):.3f}", "", "")
    table.add("… all runs (s)", ", ".join(f"{t:.3f}" for t in raw_times), "", "")
    table.add("NBD throughput (MiB/s)", f"{nbd:.1f}", f"≥ {SHARE * raw:.1f}", verdict(ok))
    table.add("Raw-file throughput (MiB/s)", f"{raw:.1f}", "", "")
    table.add("NBD / raw file", f"{share:.1%}", f"≥ {SHARE:.0%}", verdict(ok))
    table.add("NBD over the Unix socket / raw file", f"{mib_s(size, min(unix_times)) / raw:.1%}", "", "")
    copied = mib_s(size, min(copy_times)) if copy_times else 0.0
    table.add(
        f"`nbdcopy --connections={NBDCOPY_CONNECTIONS}` from NBD, best of {ROUNDS} (s)",
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
