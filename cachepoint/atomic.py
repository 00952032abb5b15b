"""Putting a file or a directory tree in place whole or not at all.

The new content is written under a temporary name in the destination's own directory (``TEMP_PREFIX``,
a name captures ignore), made durable (fsync of the file; of the tree's directories), and only then
takes its final name with a rename, after which the directory holding it is synced too. A failure, an
interrupt (SIGINT) or a SIGTERM removes the temporary; only a process killed outright (SIGKILL, power
loss) can leave one, under a name that says what it is and which destination it was for.

What may be at the destination (README.md, "Exports never overwrite by surprise"):
- nothing, an empty regular file, or (for a tree) an empty directory: written without asking;
- anything else is refused (``AlreadyExists``, exit 4) unless ``force``; then the new content replaces
  it by a rename once complete, so a failed write leaves the old one exactly as it was;
- a symlink is never written through: it is refused, and ``force`` replaces the link itself;
- a device node, FIFO or socket is refused even with ``force``: the result is a regular file, and
  writing through a device could not be undone (export to a file, then copy it with dd);
- a file never replaces a directory, even with ``force`` (a tree does, with ``force``).
A tree that replaces a non-empty directory or a file is swapped in by two renames (old aside, new in),
then the old one is deleted: a crash between them leaves the old one beside DEST under a temporary
name, never lost.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from cachepoint.errors import AlreadyExists, CachepointError, DestinationFull, InvalidInput

log = logging.getLogger("cachepoint.atomic")

TEMP_PREFIX = ".cachepoint-tmp-"
NAME_HINT_CHARS = 40  # of the final name kept in a temporary's name (4 bytes a char at most: < NAME_MAX)
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT)


class Existing(enum.Enum):
    """What is at a destination that the new content may take the place of."""

    NOTHING = "nothing"
    EMPTY = "empty"  # an empty regular file, or an empty directory for a tree
    REPLACED = "replaced"  # anything else, allowed by ``force``


def temp_name(final: str = "") -> str:
    """A fresh temporary name; it carries the start of ``final`` so a leftover says what it was for."""
    hint = final[:NAME_HINT_CHARS]
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}" + (f".{hint}" if hint else "")


def create_temp(dir_fd: int, final: str = "") -> tuple[str, int]:
    """A new private (0600) file in the directory ``dir_fd``: its name and a descriptor open for writing.
    O_EXCL and O_NOFOLLOW: never an existing file, never through a symlink planted under the name."""
    name = temp_name(final)
    return name, open_temp(dir_fd, name)


def open_temp(dir_fd: int, name: str) -> int:
    """Create the private temporary ``name`` (as ``create_temp``) and open it for writing."""
    return os.open(name, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)


def discard(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def sync_directory(path: Path | str, dir_fd: int | None = None) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(path, _DIRECTORY_FLAGS, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dest: Path, *, tree: bool, force: bool) -> Existing:
    """Apply the destination rules (module docstring) to what is at ``dest`` now."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return Existing.NOTHING
    except OSError as err:  # ENOTDIR: a file where a parent directory should be; EACCES
        raise InvalidInput(f"cannot write {dest}: {err.strerror or err}") from err
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        if force:
            return Existing.REPLACED
        raise AlreadyExists(
            f"{dest} is a symlink: an export never writes through one "
            "(name its target, remove it, or use --force to replace the link itself)"
        )
    if stat.S_ISREG(mode):
        if not tree and st.st_size == 0:
            return Existing.EMPTY
        if force:
            return Existing.REPLACED
        what = "exists and is not empty" if not tree else "exists and is not a directory"
        raise AlreadyExists(f"{dest} {what}: choose a new name, or use --force to replace it")
    if stat.S_ISDIR(mode):
        if not tree:
            raise AlreadyExists(f"{dest} is a directory: a file never replaces one, even with --force")
        try:
            empty = not os.listdir(dest)
        except OSError as err:
            raise InvalidInput(f"cannot write {dest}: {err.strerror or err}") from err
        if empty:
            return Existing.EMPTY
        if force:
            return Existing.REPLACED
        raise AlreadyExists(
            f"{dest} is a directory that is not empty: choose a new name, or use --force to replace it"
        )
    kind = (
        "block device"
        if stat.S_ISBLK(mode)
        else "character device"
        if stat.S_ISCHR(mode)
        else "FIFO"
        if stat.S_ISFIFO(mode)
        else "socket"
    )
    raise InvalidInput(
        f"{dest} is a {kind}: an export writes a regular file and never writes through or replaces "
        "a device, FIFO or socket (export to a file, then copy it)"
    )


def _make_parents(directory: Path) -> list[Path]:
    """Create the missing directories above a destination; returns those it made, outermost first."""
    missing: list[Path] = []
    probe = directory
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInput(f"cannot write under {directory}: {probe} is not a directory")
    made: list[Path] = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except OSError as err:
            _unmake(made)
            raise InvalidInput(f"cannot create {path}: {err.strerror or err}") from err
        made.append(path)
    return made


def _unmake(made: list[Path]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _explained(err: OSError, dest: Path) -> CachepointError:
    if err.errno in _FULL:
        return DestinationFull(dest, err.strerror or err)
    return InvalidInput(f"cannot write {dest}: {err.strerror or err}")


class _TermAsInterrupt:
    """While writing, SIGTERM unwinds like Ctrl-C so the cleanup runs (the default action would leave
    the temporary behind). Only the main thread can set handlers: elsewhere (a daemon's worker) the
    process's own SIGTERM handling stays as it is."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt("terminated")


@contextlib.contextmanager
def new_file(dest: Path, *, force: bool, mode: int | None = None) -> Iterator[int]:
    """A descriptor to write ``dest``'s new content into. When the block ends, the content is synced
    and takes the name ``dest`` (within the rules above); when it raises, the content vanishes.
    ``mode`` (permission bits only) is applied before the sync; else the file stays 0600 unless the
    caller changes it through the descriptor."""
    existing = check_destination(dest, tree=False, force=force)
    made = _make_parents(dest.parent)
    try:
        dir_fd = os.open(dest.parent, _DIRECTORY_FLAGS)
    except OSError as err:
        _unmake(made)
        raise _explained(err, dest) from err
    name = ""
    fd = -1
    try:
        with _TermAsInterrupt():
            # Named before it exists: a SIGTERM just after the file is made still finds it to discard.
            name = temp_name(dest.name)
            fd = open_temp(dir_fd, name)
            yield fd
            if mode is not None:
                os.fchmod(fd, mode & 0o777)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            _install_file(dir_fd, name, dest, existing)
            os.fsync(dir_fd)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        if name:
            discard(dir_fd, name)
        _unmake(made)
        if isinstance(err, OSError):
            raise _explained(err, dest) from err
        raise
    finally:
        os.close(dir_fd)


def _install_file(dir_fd: int, name: str, dest: Path, existing: Existing) -> None:
    if existing is not Existing.NOTHING:
        os.rename(name, dest.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a file or a link
        return
    # Nothing was there when we looked: a hard link takes the name only if it is still free, so
    # something created there meanwhile is never overwritten.
    try:
        os.link(name, dest.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError as err:
        raise AlreadyExists(f"{dest} was created while it was being written: choose a new name") from err
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # A file system without hard links (vfat, some FUSE): look again, then rename.
        try:
            os.stat(dest.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(name, dest.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise AlreadyExists(f"{dest} was created while it was being written: choose a new name") from err
    os.unlink(name, dir_fd=dir_fd)


@contextlib.contextmanager
def new_tree(dest: Path, *, force: bool) -> Iterator[Path]:
    """A new directory beside ``dest`` to build a tree in. The caller syncs what it writes (each file,
    each directory it creates); when the block ends the root is synced and takes the name ``dest``
    (within the rules above); when it raises, the whole tree vanishes."""
    existing = check_destination(dest, tree=True, force=force)
    made = _make_parents(dest.parent)
    temp = dest.parent / temp_name(dest.name)
    try:
        os.mkdir(temp)  # mode 0777 less the umask, as a plain mkdir of DEST would have had
        if existing is Existing.EMPTY:  # the empty directory the user prepared keeps its mode
            os.chmod(temp, stat.S_IMODE(os.stat(dest).st_mode))
    except OSError as err:
        _unmake(made)
        raise _explained(err, dest) from err
    try:
        with _TermAsInterrupt():
            yield temp
            sync_directory(temp)
            replaced = _install_tree(temp, dest, existing)
            sync_directory(dest.parent)
    except BaseException as err:
        remove_tree(temp)
        _unmake(made)
        if isinstance(err, OSError):
            raise _explained(err, dest) from err
        raise
    if replaced is not None:  # DEST is complete and durable: only now does the old content go
        _delete_replaced(replaced, dest)


def _install_tree(temp: Path, dest: Path, existing: Existing) -> Path | None:
    """Rename the tree into place; returns where the content it replaced was moved, if any."""
    if existing is not Existing.REPLACED:
        # rename(2) replaces an empty directory and refuses a non-empty one or a file: what appeared
        # at DEST since the check is never lost.
        try:
            os.rename(temp, dest)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise AlreadyExists(f"{dest} was filled while the export ran: choose a new name") from err
            raise
        return None
    aside = dest.parent / temp_name(dest.name)
    os.rename(dest, aside)
    try:
        os.rename(temp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    return aside


def _delete_replaced(aside: Path, dest: Path) -> None:
    try:
        if os.path.isdir(aside) and not os.path.islink(aside):
            remove_tree(aside)
        else:
            os.unlink(aside)
    except OSError as err:  # the export is done; the old content is only not deleted yet
        log.warning("the content %s replaced is left at %s: %s", dest, aside, err)


def remove_tree(path: Path) -> None:
    """Delete a tree this module made (symlinks in it are removed, never followed)."""

    def writable_parent(func: Callable[[str], object], failed: str, exc_info: object) -> None:
        # A directory whose final mode was already set may forbid removing its entries: open it, retry.
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    try:
        shutil.rmtree(path, onerror=writable_parent)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("could not remove %s: %s", path, err)
