"""Reading a live tree's names and stats, once, in manifest order, without opening any file.

The order is the one ``cachepoint ingest`` uses (names sorted within each directory, parents before
children), so a capture and an ingest of the same tree make the same manifest. Symlinks are recorded,
never followed; the root itself is followed when it is a symlink (the user named it). Each directory
is opened relative to its parent's descriptor with O_NOFOLLOW, so a directory swapped for a symlink
while the walk runs is not entered; the inode and device recorded for each file let its reader check
that it opens the same file (``SourceFile.identity``). Entries that
cannot be kept are listed as skipped with the reason: sockets, fifos, devices, names that are not
UTF-8 (a manifest path is UTF-8 on every node), directories that cannot be listed. Names starting
with ``TEMP_PREFIX`` are files in flight (restore-dir's, an export's), and the directories in
``skip`` (the store: by default it lives in the home directory, under ~/.local/share) are not part of
the tree.
"""

from __future__ import annotations

import contextlib
import gc
import os
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cachepoint.atomic import TEMP_PREFIX
from cachepoint.errors import SourceUnreadable
from cachepoint.layers.source import WHITEOUT_PREFIX, special_kind
from cachepoint.model import EntryType

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class Walked(NamedTuple):
    """One entry of the live tree (a NamedTuple: a capture makes one per file, 50,000 and more)."""

    path: str
    type: EntryType
    mode: int  # permission bits
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    target: str = ""  # a symlink's target, as read, never followed


@dataclass
class WalkResult:
    entries: list[Walked] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector. A walk allocates several objects per file and no
    reference cycles, yet each batch of allocations makes the collector scan the growing heap again:
    about a fifth of the time of a re-capture of 50,000 files. Nested uses are fine."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_root(root: Path) -> None:
    try:
        st = os.stat(root)
    except OSError as err:
        raise SourceUnreadable(str(root), err.strerror or str(err)) from err
    if not stat.S_ISDIR(st.st_mode):
        raise SourceUnreadable(str(root), "not a directory (capture takes a directory tree)")


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory, to ``skip`` it whatever path leads to it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk(root: Path, skip: Collection[tuple[int, int]] = ()) -> WalkResult:
    check_root(root)
    result = WalkResult()
    entries, skipped = result.entries, result.skipped
    directory_type, file_type, symlink_type = EntryType.DIRECTORY, EntryType.FILE, EntryType.SYMLINK

    def visit(dir_fd: int, rel: str) -> None:
        try:
            with os.scandir(dir_fd) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if not rel:
                raise SourceUnreadable(str(root), err.strerror or str(err)) from err
            skipped.append((rel, f"cannot list: {err.strerror or err}"))
            return
        for child in children:
            name = child.name
            if name.startswith(TEMP_PREFIX):
                continue
            child_rel = f"{rel}/{name}" if rel else name
            if not name.isascii():  # only then can it hold undecodable bytes (as surrogates)
                try:
                    name.encode()
                except UnicodeEncodeError:
                    shown = child_rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                    skipped.append((shown, "name is not valid UTF-8"))
                    continue
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the directory was listed
            mode = st.st_mode
            kind = stat.S_IFMT(mode)
            if name.startswith(WHITEOUT_PREFIX) and len(name) > len(WHITEOUT_PREFIX):
                hidden = name[len(WHITEOUT_PREFIX) :]
                hidden_rel = f"{rel}/{hidden}" if rel else hidden
                entries.append(Walked(hidden_rel, EntryType.WHITEOUT, 0, 0, st.st_mtime_ns, 0, 0, 0))
            elif kind == stat.S_IFREG:
                entries.append(
                    Walked(
                        child_rel,
                        file_type,
                        mode & 0o7777,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_ino,
                        st.st_dev,
                    )
                )
            elif kind == stat.S_IFDIR:
                if skip and (st.st_dev, st.st_ino) in skip:
                    continue
                try:
                    fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                except OSError as err:  # ELOOP: swapped for a symlink since it was listed; EACCES
                    skipped.append((child_rel, f"cannot open: {err.strerror or err}"))
                    continue
                try:
                    entries.append(
                        Walked(child_rel, directory_type, mode & 0o7777, 0, st.st_mtime_ns, 0, 0, 0)
                    )
                    visit(fd, child_rel)
                finally:
                    os.close(fd)
            elif kind == stat.S_IFLNK:
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except (FileNotFoundError, OSError):
                    continue  # gone, or no longer a symlink: the next capture sees what it became
                entries.append(
                    Walked(
                        child_rel, symlink_type, mode & 0o7777, len(target), st.st_mtime_ns, 0, 0, 0, target
                    )
                )
            else:
                skipped.append((child_rel, special_kind(mode)))

    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise SourceUnreadable(str(root), err.strerror or str(err)) from err
    try:
        with no_cyclic_gc():
            visit(root_fd, "")
    finally:
        os.close(root_fd)
    return result
