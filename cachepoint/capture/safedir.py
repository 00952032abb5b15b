"""Changing a live directory tree without ever leaving it.

Every path is relative without ``..`` (``check_relative_path``), and is reached one component at a
time: each directory is opened with O_NOFOLLOW | O_DIRECTORY relative to its parent's descriptor, and
every change (create, rename, remove, symlink, chmod, utime) is made relative to the descriptor of
the directory it happens in. A symlink anywhere on the way, even one planted while a restore runs,
is therefore never followed: the open fails and the path is refused with ``UnsafePath``. Only the
root is followed, once, when it is itself a symlink (the user named it).

Files and symlinks are written under a temporary name in their final directory (``cachepoint.atomic``),
given their mode and mtime, made durable, then renamed over the old entry; ``sync`` makes the renames
durable. A failure removes the temporary; a crash leaves either the old entry or the new one, plus
perhaps a ``TEMP_PREFIX`` file that captures ignore.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cachepoint.atomic import create_temp, discard, temp_name
from cachepoint.errors import SourceUnreadable, UnsafePath
from cachepoint.model import check_relative_path

OPEN_DIRECTORIES = 64  # descriptors kept open for reuse: siblings share their parent's
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@dataclass(frozen=True, slots=True)
class TempFile:
    """A file being written under a temporary name next to ``path``; ``fd`` is open for writing."""

    path: str
    name: str
    fd: int


class SafeDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise SourceUnreadable(str(root), err.strerror or str(err)) from err
        self._open: OrderedDict[str, int] = OrderedDict()
        self._renamed_in: set[str] = set()  # directories whose names changed since the last sync

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        os.close(self._root_fd)

    def _refuse(self, path: str, why: str) -> UnsafePath:
        return UnsafePath(path, str(self.root), why)

    def directory(self, rel: str) -> int:
        """A descriptor of directory ``rel`` ("" is the root), reached without following symlinks."""
        if not rel:
            return self._root_fd
        fd = self._open.get(rel)
        if fd is not None:
            self._open.move_to_end(rel)
            return fd
        check_relative_path(rel)
        parent, _, name = rel.rpartition("/")
        parent_fd = self.directory(parent)
        try:
            fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._refuse(rel, "it is not a directory here (a symlink is never followed)") from err
            raise self._refuse(rel, err.strerror or str(err)) from err
        self._open[rel] = fd
        if len(self._open) > OPEN_DIRECTORIES:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        return fd

    def _parent(self, path: str) -> tuple[int, str]:
        check_relative_path(path)
        parent, _, name = path.rpartition("/")
        return self.directory(parent), name

    def _forget(self, path: str) -> None:
        """Drop cached descriptors of ``path`` and below (it is being removed or replaced)."""
        prefix = path + "/"
        for rel in [r for r in self._open if r == path or r.startswith(prefix)]:
            os.close(self._open.pop(rel))

    def lstat(self, path: str) -> os.stat_result | None:
        fd, name = self._parent(path)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def mkdir(self, path: str) -> None:
        fd, name = self._parent(path)
        try:
            os.mkdir(name, 0o700, dir_fd=fd)  # its mode is set last, when nothing more goes in
        except FileExistsError:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise self._refuse(path, "something that is not a directory is in the way") from None

    def remove(self, path: str) -> bool:
        """Remove a file, symlink or empty directory; False when a directory is not empty (something
        was added since the capture: it is left in place)."""
        fd, name = self._parent(path)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            self._forget(path)
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
        else:
            os.unlink(name, dir_fd=fd)
        return True

    def create_temp(self, path: str) -> TempFile:
        fd, name = self._parent(path)
        temp, temp_fd = create_temp(fd, name)
        return TempFile(path, temp, temp_fd)

    def finish_temp(self, temp: TempFile, mode: int, mtime_ns: int) -> None:
        """Give the written file its mode and mtime, make it durable, close it and rename it into place
        (a rename replaces a symlink at the destination; it never writes through one). On a failure
        the temporary is removed."""
        try:
            os.fchmod(temp.fd, mode)
            os.utime(temp.fd, ns=(mtime_ns, mtime_ns))
            os.fsync(temp.fd)
        except BaseException:
            self.discard_temp(temp)
            raise
        os.close(temp.fd)
        self._install(temp.path, temp.name)

    def discard_temp(self, temp: TempFile) -> None:
        os.close(temp.fd)
        fd, _ = self._parent(temp.path)
        discard(fd, temp.name)

    def _install(self, path: str, temp: str) -> None:
        fd, name = self._parent(path)
        try:
            os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as err:
            discard(fd, temp)
            if err.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise self._refuse(path, "a directory is in the way") from err
            raise
        self._renamed_in.add(path.rpartition("/")[0])

    def symlink(self, path: str, target: str, mtime_ns: int) -> None:
        fd, final = self._parent(path)
        name = temp_name(final)
        os.symlink(target, name, dir_fd=fd)
        try:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
        except BaseException:
            discard(fd, name)
            raise
        self._install(path, name)

    def sync(self) -> None:
        """Make the renames so far durable: fsync each directory they happened in."""
        for rel in sorted(self._renamed_in):
            os.fsync(self.directory(rel))
        self._renamed_in.clear()

    def set_directory(self, path: str, mode: int, mtime_ns: int) -> None:
        fd = self.directory(path)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
