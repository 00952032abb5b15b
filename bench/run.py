"""``python -m bench.run``: measure the store against the machine's ceiling and write bench/report.md.

Each section is a function in SECTIONS, run in order; later sections (replication, NBD, capture) are
added by appending theirs. Progress goes to stderr; the report is rewritten whole from this run's
measurements. BENCH_RUNS=N times every figure N times instead of 3 (1: a smoke run, whose figures
are not to be trusted).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.capture_bench import capture_recapture
from bench.ceiling import ceiling, census
from bench.fanout_model import fanout_model
from bench.harness import Bench, Section, SectionFn, human_bytes, parse_size, remove, verdict
from bench.ingest_bench import clones, first_ingest, reingest
from bench.nbd_bench import nbd_read
from bench.read_paths import read_paths
from bench.real_image_bench import real_image
from bench.replicas_bench import replicas
from bench.replication_bench import delta_sync
from bench.report import render, write_atomic
from bench.site_fanout_bench import site_fanout

HERE = Path(__file__).resolve().parent
QUICK_SIZE = "64M"

# Order matters: a section may use figures of those before it (the ingest targets use the ceiling).
SECTIONS: list[SectionFn] = [
    ceiling,
    first_ingest,
    reingest,
    clones,
    delta_sync,
    nbd_read,
    capture_recapture,
    real_image,
    read_paths,
    site_fanout,
    fanout_model,
    replicas,
]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=_size, default=parse_size("1G"), help="image size, e.g. 1G, 64M")
    sizes.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE} image, for smoke tests")
    parser.add_argument("--out", type=Path, help="report path [bench/report.md]")
    parser.add_argument(
        "--only",
        action="append",
        choices=[fn.__name__ for fn in SECTIONS],
        help="run only this section (repeatable), e.g. delta_sync; name the ones whose figures it uses "
        "too (the ingest targets use ceiling). The report then holds only those, so --out is required: "
        "bench/report.md stays the record of a whole run",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch directory, left in place afterwards "
        "(default: a fresh one under bench/work/, removed at the end)",
    )
    args = parser.parse_args(argv)
    if args.only and args.out is None:
        parser.error("--only writes a partial report: name it with --out")
    args.out = args.out or HERE / "report.md"
    if args.quick:
        args.size = parse_size(QUICK_SIZE)
    return args


def run(bench: Bench, only: list[str] | None = None) -> list[Section]:
    done: list[Section] = []
    for fn in SECTIONS:
        if only and fn.__name__ not in only:
            continue
        bench.log(f"section {fn.__name__}")
        section = fn(bench)
        bench.sections[section.key] = section
        done.append(section)
        for warning in section.warnings:
            bench.log(f"WARNING: {warning}")
        for check in section.checks:
            bench.log(f"{verdict(check.passed)}: {check.name}: {check.measured} (target {check.target})")
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work is None:
        (HERE / "work").mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=HERE / "work"))
        owned = True
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
        owned = False
    # Other work on the machine skews every figure; the report records how busy it was.
    load = os.getloadavg()
    bench = Bench(args.size, work, quick=args.quick, report_dir=args.out.parent)
    bench.log(f"benchmark of a {human_bytes(args.size)} image in {work}")
    try:
        # Reading v1 for its census also warms the page cache before the first timed run.
        image = census(bench.v1)
        sections = run(bench, args.only)
        elapsed = time.perf_counter() - bench.started
        write_atomic(args.out, render(sections, image, args.size, elapsed, (load, os.getloadavg())))
    finally:
        if owned:
            remove(work)
    bench.log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
