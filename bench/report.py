"""Rendering the benchmark report as Markdown, and writing it atomically."""

from __future__ import annotations

import os
import platform
import tempfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import xxhash
import zstandard

from bench.ceiling import Census
from bench.gen_image import BLOCK
from bench.harness import RUNS, V1_SEED, Section, Table, human_bytes, verdict


def _cpu_model() -> str:
    # platform.processor() is empty or just the architecture on most Linux systems; /proc/cpuinfo
    # names the part.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


Load = tuple[float, float, float]


def _load(load: Load) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def machine(load: tuple[Load, Load]) -> list[tuple[str, str]]:
    zstd_lib = ".".join(str(p) for p in zstandard.ZSTD_VERSION)
    return [
        ("CPUs", str(os.cpu_count())),
        ("Processor", f"{_cpu_model()} ({platform.machine()})"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Load average (1/5/15 min) at the start / at the end", f"{_load(load[0])}; {_load(load[1])}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("rocksdict", _version("rocksdict")),
        ("zstandard", f"{_version('zstandard')} (libzstd {zstd_lib})"),
        ("xxhash", f"{_version('xxhash')} (libxxhash {xxhash.XXHASH_VERSION})"),
    ]


def _table(table: Table) -> list[str]:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(table.headers), "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += [row(r) for r in table.rows]
    return lines


def _composition(census: Census) -> Table:
    table = Table(["Blocks", "Count", "Share"])
    for name, count in (
        ("All-zero (holes)", census.zero),
        ("Compressible (zstd-1 saves ≥ 1/8)", census.compressible),
        ("Incompressible", census.incompressible),
        ("Total", census.blocks),
    ):
        table.add(name, count, f"{count / census.blocks:.1%}")
    return table


def render(
    sections: list[Section], census: Census, size: int, elapsed: float, load: tuple[Load, Load]
) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = ["# cachepoint benchmark", "", f"Date: {now}  ", f"Total run time: {elapsed:.0f} s", ""]
    out += ["## Machine", ""]
    out += [f"- {name}: {value}" for name, value in machine(load)]
    ratio = census.data_bytes / census.compressed_bytes if census.compressed_bytes else 0.0
    out += [
        "",
        "## Image",
        "",
        f"v1 is a generated {human_bytes(size)} image (`bench/gen_image.py`, seed {V1_SEED}) of "
        f"{census.blocks} blocks of {BLOCK // 1024} KiB, in runs of 1–32 blocks of one kind; zero "
        "blocks are written as zeros, not left sparse. Composition, measured from the image's bytes:",
        "",
    ]
    out += _table(_composition(census))
    out += [
        "",
        f"Non-zero data: {human_bytes(census.data_bytes)}, {human_bytes(census.compressed_bytes)} after "
        f"zstd-1 per block (ratio {ratio:.3f}, incompressible blocks counted raw).",
        "",
        f"Every timed figure is the best of {RUNS} runs, for the ceilings and for our ingests alike, "
        "every image is read once before its timed runs so that they start from a warm page cache, "
        "and each timed run starts after `os.sync()` so that earlier writes are not flushed on its clock.",
        "",
    ]
    checks = [c for s in sections for c in s.checks]
    if checks:
        out += ["## Summary", ""]
        summary = Table(["Acceptance target", "Measured", "Target", "Result"])
        for c in checks:
            summary.add(c.name, c.measured, c.target, verdict(c.passed))
        out += _table(summary)
        out += [""]
    for section in sections:
        out += [f"## {section.title}", "", section.method, ""]
        out += _table(section.table)
        out += [""]
        for warning in section.warnings:
            out += [f"> **Warning:** {warning}", ""]
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file in the same directory and a rename: a reader sees the
    old report or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
