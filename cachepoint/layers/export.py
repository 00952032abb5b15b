"""Export: write a version (or a composited image) back out, byte for byte, holes as holes.

Worker threads fetch blocks, verify each against its id (zstd and SHA-256 release the GIL) and
pwrite them; a hole is never written, the file is sized with ftruncate so it stays sparse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockMissing, InvalidInput
from cachepoint.ids import HOLE_DIGEST, BlockId
from cachepoint.layers.source import WHITEOUT_PREFIX
from cachepoint.model import EntryType, FileEntry, Manifest
from cachepoint.store.store import Store

JOB_BLOCKS_BYTES = 4 * 1024 * 1024
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class PlacedFile:
    """A file to write: its entry and the block size its ids were cut with."""

    entry: FileEntry
    block_size: int


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: str
    files: int
    bytes_written: int
    logical_bytes: int

    def as_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "files": self.files,
            "bytes_written": self.bytes_written,
            "logical_bytes": self.logical_bytes,
        }


def _jobs(fd: int, placed: PlacedFile) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    per_job = max(1, JOB_BLOCKS_BYTES // placed.block_size)
    blocks = [(i * placed.block_size, d) for i, d in enumerate(placed.entry.digests()) if d != HOLE_DIGEST]
    for start in range(0, len(blocks), per_job):
        yield fd, blocks[start : start + per_job]


class _Writer:
    def __init__(self, store: Store) -> None:
        self.store = store

    def write_job(self, job: tuple[int, list[tuple[int, bytes]]]) -> int:
        fd, blocks = job
        values = self.store.blocks.raw_many([d for _, d in blocks])
        written = 0
        for (offset, digest), value in zip(blocks, values, strict=True):
            if value is None:
                raise BlockMissing(BlockId(digest))
            data = decode_verified(digest, value)
            os.pwrite(fd, data, offset)
            written += len(data)
        return written


def write_files(
    store: Store, targets: list[tuple[PlacedFile, Path]], progress: ProgressFn | None = None
) -> int:
    """Write each file's blocks in parallel; returns the bytes written (holes excluded)."""
    fds: list[int] = []
    try:
        for _, path in targets:
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600))
        placed = [(p, fd) for (p, _), fd in zip(targets, fds, strict=True)]
        return write_open_files(store, placed, progress)
    finally:
        for fd in fds:
            os.close(fd)


def write_open_files(
    store: Store, targets: list[tuple[PlacedFile, int]], progress: ProgressFn | None = None, done: int = 0
) -> int:
    """Write each file's blocks through descriptors the caller opened (and closes); sizes them with
    ftruncate so holes stay holes. Returns the bytes written; ``done`` offsets the progress figures."""
    total = done + sum(p.entry.size for p, _ in targets)
    start = done
    writer = _Writer(store)
    with ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="export") as pool:
        jobs = []
        for placed, fd in targets:
            os.ftruncate(fd, placed.entry.size)
            jobs.extend(_jobs(fd, placed))
        for written in pool.map(writer.write_job, jobs):
            done += written
            if progress is not None:
                progress(done, total)
    return done - start


def export_single(
    store: Store, placed: PlacedFile, dest: Path, progress: ProgressFn | None = None
) -> ExportResult:
    if dest.is_dir():
        dest = dest / placed.entry.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = write_files(store, [(placed, dest)], progress)
    os.chmod(dest, placed.entry.mode)
    os.utime(dest, ns=(placed.entry.mtime_ns, placed.entry.mtime_ns))
    return ExportResult(str(dest), 1, written, placed.entry.size)


def _prepare_dest(dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            raise InvalidInput(f"cannot export a tree to {dest}: it exists and is not a directory")
        if any(dest.iterdir()):
            raise InvalidInput(f"cannot export a tree to {dest}: the directory is not empty")
    else:
        dest.mkdir(parents=True)


def export_tree(
    store: Store, entries: list[PlacedFile], dest: Path, progress: ProgressFn | None = None
) -> ExportResult:
    """Restore a tree under dest. A path can never land outside dest: manifest paths are relative
    without '..', and each entry's parent must be a directory this export created itself (so a
    symlink in the tree is never followed)."""
    _prepare_dest(dest)
    directories = {""}
    files: list[tuple[PlacedFile, Path]] = []
    for placed in entries:
        entry = placed.entry
        parent = entry.path.rpartition("/")[0]
        if parent not in directories:
            raise InvalidInput(
                f"manifest entry {entry.path!r}: its parent {parent!r} is not a directory of the tree"
            )
        target = dest / entry.path
        if entry.type == EntryType.DIRECTORY:
            os.mkdir(target, 0o700)
            directories.add(entry.path)
        elif entry.type == EntryType.SYMLINK:
            os.symlink(entry.target, target)
        elif entry.type == EntryType.WHITEOUT:
            name = entry.path.rpartition("/")[2]
            marker = target.with_name(WHITEOUT_PREFIX + name)
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        elif entry.type == EntryType.FILE:
            files.append((placed, target))
    written = write_files(store, files, progress)
    # Metadata last, deepest first: creating children changes a directory's mtime.
    for placed in reversed(entries):
        entry = placed.entry
        target = dest / entry.path
        if entry.type == EntryType.SYMLINK:
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        elif entry.type in (EntryType.FILE, EntryType.DIRECTORY):
            os.chmod(target, entry.mode)
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))
    logical = sum(p.entry.size for p, _ in files)
    return ExportResult(str(dest), len(files), written, logical)


def place(manifest: Manifest) -> list[PlacedFile]:
    return [PlacedFile(e, manifest.block_size) for e in manifest.entries]


def export_manifest(
    store: Store, manifest: Manifest, dest: Path, progress: ProgressFn | None = None
) -> ExportResult:
    if manifest.single_file:
        return export_single(store, PlacedFile(manifest.entries[0], manifest.block_size), dest, progress)
    return export_tree(store, place(manifest), dest, progress)
