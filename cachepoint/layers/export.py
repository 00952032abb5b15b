"""Export: write a version (or a composited image) back out, byte for byte, holes as holes.

Worker threads read blocks from a source (cachepoint/blocksource: the store, by default), decode
them (zstd releases the GIL) and pwrite them; a hole is never written, the file is sized with
ftruncate so it stays sparse.
Everything is written beside DEST and renamed into place once synced (``cachepoint.atomic``): a
failed export leaves nothing behind, and what was at DEST (with ``force``) stays until the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cachepoint.atomic import new_file, new_tree
from cachepoint.blocksource import BlockSource, as_source
from cachepoint.blocksource.base import require
from cachepoint.errors import InvalidInput
from cachepoint.ids import HOLE_DIGEST
from cachepoint.layers.pieces import Pieces
from cachepoint.layers.source import WHITEOUT_PREFIX
from cachepoint.model import EntryType, FileEntry, Manifest
from cachepoint.store.store import Store

JOB_BLOCKS_BYTES = 4 * 1024 * 1024
OPEN_FILES = 256  # files of a tree open at once while their blocks are written (well under ulimit -n)
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class PlacedFile:
    """A file to write: its entry and the block size its ids were cut with (for content chunks, the
    longest chunk: where each one lies is the entry's extent index, ``entry.span``). ``pieces``: a
    disk composited from layers without one grid (cachepoint/layers/pieces.py); its bytes are then
    there, and ``entry`` names no block (only the file's path, mode, size and mtime)."""

    entry: FileEntry
    block_size: int
    pieces: Pieces | None = None


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


# Where a block's bytes go: (offset in the file, block id, first byte of the block, bytes; -1: to its end).
Placement = tuple[int, bytes, int, int]
Job = tuple[int, list[Placement]]


def _jobs(fd: int, placed: PlacedFile) -> Iterator[Job]:
    per_job = max(1, JOB_BLOCKS_BYTES // placed.block_size)
    entry, bs, pieces = placed.entry, placed.block_size, placed.pieces
    if pieces is not None:
        blocks = [(s, digest, skip, e - s) for s, e, digest, skip in map(pieces.piece, range(len(pieces)))]
    else:
        blocks = [(entry.span(i, bs)[0], d, 0, -1) for i, d in enumerate(entry.digests()) if d != HOLE_DIGEST]
    for start in range(0, len(blocks), per_job):
        yield fd, blocks[start : start + per_job]


Reader = Store | BlockSource  # where blocks are read: a store reads its own


class _Writer:
    def __init__(self, source: BlockSource) -> None:
        self.source = source

    def write_job(self, job: Job) -> int:
        fd, blocks = job
        ids = list(dict.fromkeys(d for _, d, _, _ in blocks))
        found = self.source.get_many(ids)
        require(ids, found)
        written = 0
        for offset, digest, skip, length in blocks:
            data = found[digest]
            if skip or length >= 0:
                data = memoryview(data)[skip : skip + length if length >= 0 else None]
            written += os.pwrite(fd, data, offset)
        return written


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_files(
    store: Reader, targets: list[tuple[PlacedFile, Path]], progress: ProgressFn | None = None
) -> int:
    """Create each file (new: O_EXCL), write its blocks in parallel, give it its mode and mtime and
    sync it; returns the bytes written (holes excluded). At most OPEN_FILES are open at once."""
    total = sum(p.entry.size for p, _ in targets)
    overall = None if progress is None else lambda done, _: progress(done, total)
    done = 0
    for start in range(0, len(targets), OPEN_FILES):
        fds: list[int] = []
        try:
            batch = targets[start : start + OPEN_FILES]
            for _, path in batch:
                fds.append(os.open(path, _NEW_FILE, 0o600))
            placed = [(p, fd) for (p, _), fd in zip(batch, fds, strict=True)]
            done += write_open_files(store, placed, overall, done, finish=True)
        finally:
            for fd in fds:
                os.close(fd)
    return done


def _finish(target: tuple[PlacedFile, int]) -> None:
    placed, fd = target
    os.fchmod(fd, placed.entry.mode)
    os.utime(fd, ns=(placed.entry.mtime_ns, placed.entry.mtime_ns))
    os.fsync(fd)


def write_open_files(
    store: Reader,
    targets: list[tuple[PlacedFile, int]],
    progress: ProgressFn | None = None,
    done: int = 0,
    finish: bool = False,
) -> int:
    """Write each file's blocks through descriptors the caller opened (and closes); sizes them with
    ftruncate so holes stay holes. With ``finish``, then sets each file's mode and mtime and syncs it
    (in parallel: a file system commits concurrent fsyncs together). Returns the bytes written;
    ``done`` offsets the progress figures."""
    total = done + sum(p.entry.size for p, _ in targets)
    start = done
    writer = _Writer(as_source(store))
    pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="export")
    try:
        jobs = []
        for placed, fd in targets:
            os.ftruncate(fd, placed.entry.size)
            jobs.extend(_jobs(fd, placed))
        for written in pool.map(writer.write_job, jobs):
            done += written
            if progress is not None:
                progress(done, total)
        if finish:
            list(pool.map(_finish, targets))
    finally:
        # On a failure (a bad block, Ctrl-C) the queued jobs are dropped, not run to the end; the
        # running ones finish before the caller closes and removes their files.
        pool.shutdown(wait=True, cancel_futures=True)
    return done - start


def export_single(
    store: Reader,
    placed: PlacedFile,
    dest: Path,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> ExportResult:
    """Write one file at ``dest``, or under its own name in ``dest`` when that is a directory (or a
    symlink to one, as cp does); ``force`` replaces what is there (see ``cachepoint.atomic``)."""
    if dest.is_dir():
        dest = dest / placed.entry.path
    with new_file(dest, force=force) as fd:
        written = write_open_files(store, [(placed, fd)], progress, finish=True)
    return ExportResult(str(dest), 1, written, placed.entry.size)


def export_tree(
    store: Reader,
    entries: list[PlacedFile],
    dest: Path,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> ExportResult:
    """Restore a tree at dest (new, or an empty directory; ``force`` replaces anything but a device).
    It is built beside dest and renamed into place when complete and synced. A path can never land
    outside the tree: manifest paths are relative without '..', and each entry's parent must be a
    directory this export created itself (so a symlink in the tree is never followed)."""
    with new_tree(dest, force=force) as root:
        files, written = _build_tree(store, entries, root, progress)
    logical = sum(p.entry.size for p, _ in files)
    return ExportResult(str(dest), len(files), written, logical)


def _build_tree(
    store: Reader, entries: list[PlacedFile], dest: Path, progress: ProgressFn | None
) -> tuple[list[tuple[PlacedFile, Path]], int]:
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
    written = write_files(store, files, progress)  # files get their mode and mtime, and are synced
    # Directories last, deepest first (creating children changes a directory's mtime); each is synced
    # so the names in it are durable before the tree takes its final name.
    for placed in reversed(entries):
        entry = placed.entry
        target = dest / entry.path
        if entry.type == EntryType.SYMLINK:
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        elif entry.type == EntryType.DIRECTORY:
            fd = os.open(target, _DIRECTORY)  # opened before its mode may forbid reading it
            try:
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                os.fsync(fd)
            finally:
                os.close(fd)
    return files, written


def place(manifest: Manifest) -> list[PlacedFile]:
    return [PlacedFile(e, manifest.block_size) for e in manifest.entries]


def export_manifest(
    store: Reader,
    manifest: Manifest,
    dest: Path,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> ExportResult:
    if manifest.single_file:
        placed = PlacedFile(manifest.entries[0], manifest.block_size)
        return export_single(store, placed, dest, progress, force)
    return export_tree(store, place(manifest), dest, progress, force)
