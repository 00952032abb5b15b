"""What an ingest reads: a single disk-image file or a directory tree, walked once, in order."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cachepoint.errors import SourceUnreadable
from cachepoint.model import EntryType, FileEntry

WHITEOUT_PREFIX = ".wh."  # the OCI/aufs convention: ".wh.NAME" hides NAME of lower layers


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A regular file whose bytes the ingest cuts into blocks."""

    entry_index: int
    disk_path: str
    size: int
    # (inode, device) the file had when it was walked: when set, the ingest opens it without following
    # a symlink and refuses another file found at the path (a capture's guard against a directory
    # swapped for a symlink between its walk and its reads).
    identity: tuple[int, int] | None = None


@dataclass
class SourceTree:
    single_file: bool
    entries: list[FileEntry]  # FILE entries still without blocks
    files: list[SourceFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def special_kind(mode: int) -> str:
    """What a file that is not a regular file, directory or symlink is (skipped, and said so)."""
    for test, name in (
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo"),
    ):
        if test(mode):
            return name
    return "unsupported file type"


def scan(path: Path) -> SourceTree:
    try:
        st = os.lstat(path)
    except OSError as err:
        raise SourceUnreadable(str(path), err.strerror or str(err)) from err
    if stat.S_ISREG(st.st_mode):
        _check_readable(str(path))
        entry = FileEntry(
            path.name or "image", EntryType.FILE, st.st_mode & 0o7777, st.st_size, st.st_mtime_ns
        )
        return SourceTree(True, [entry], [SourceFile(0, str(path), st.st_size)])
    if stat.S_ISDIR(st.st_mode):
        return _scan_tree(path)
    if stat.S_ISBLK(st.st_mode):
        raise SourceUnreadable(str(path), "block devices are not ingested yet; copy the device to a file")
    raise SourceUnreadable(str(path), "not a regular file or a directory")


def _check_readable(disk_path: str) -> None:
    try:
        os.close(os.open(disk_path, os.O_RDONLY))
    except OSError as err:
        raise SourceUnreadable(disk_path, err.strerror or str(err)) from err


def _scan_tree(root: Path) -> SourceTree:
    tree = SourceTree(False, [], [])

    def walk(directory: str, rel: str) -> None:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise SourceUnreadable(directory, err.strerror or str(err)) from err
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            st = child.stat(follow_symlinks=False)
            mode = st.st_mode
            if child.name.startswith(WHITEOUT_PREFIX) and len(child.name) > len(WHITEOUT_PREFIX):
                hidden = child.name[len(WHITEOUT_PREFIX) :]
                hidden_rel = f"{rel}/{hidden}" if rel else hidden
                tree.entries.append(FileEntry(hidden_rel, EntryType.WHITEOUT, 0, 0, st.st_mtime_ns))
            elif stat.S_ISDIR(mode):
                tree.entries.append(
                    FileEntry(child_rel, EntryType.DIRECTORY, mode & 0o7777, 0, st.st_mtime_ns)
                )
                walk(child.path, child_rel)
            elif stat.S_ISLNK(mode):
                target = os.readlink(child.path)
                tree.entries.append(
                    FileEntry(
                        child_rel, EntryType.SYMLINK, mode & 0o7777, len(target), st.st_mtime_ns, target
                    )
                )
            elif stat.S_ISREG(mode):
                _check_readable(child.path)
                index = len(tree.entries)
                tree.entries.append(
                    FileEntry(child_rel, EntryType.FILE, mode & 0o7777, st.st_size, st.st_mtime_ns)
                )
                tree.files.append(SourceFile(index, child.path, st.st_size))
            else:
                tree.skipped.append((child_rel, special_kind(mode)))

    walk(str(root), "")
    return tree


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of a file that hold data; the rest are holes (sparse files stay cheap)."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole from offset to the end
                break
            return [(0, size)]  # no SEEK_DATA on this filesystem: read everything
        if start >= size:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        offset = end
    return extents


def all_hole(fd: int, start: int, length: int) -> bool:
    """Whether bytes [start, start+length) of a file lie in a hole of a sparse file (nothing to read)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= start + length
    except OSError as err:
        # ENXIO: only holes from ``start`` to the end (an image whose tail was never written), or
        # ``start`` is past the end: a file that shrank must still be read, to fail its short read.
        return err.errno == errno.ENXIO and os.fstat(fd).st_size >= start + length
